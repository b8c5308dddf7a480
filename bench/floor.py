"""What the engine's part of a ``/predict`` at concurrency 1 costs, against what it cannot go below.

On real MELD test prompts (rendered by the service's predictor: template, window, retrieved
demonstrations), one engine:

* **engine**: ``Engine.classify`` of one prompt, as the service calls it, in two cases: the
  prompt was classified before, so all but its last block is in the prefix cache (the
  benchmark's ``/predict`` after ``/predict_dialogue``), and a prompt never seen (every token
  computed);
* **torch**: the same model's forward pass over the same new tokens in plain PyTorch
  (transformers, the cached prefix handed over as its KV cache, logits at the last position
  only): the arithmetic and weight reads without vLLM's scheduler, sampler and process hops;
* **matrix products**: the step's projections alone at the model's shapes, through the engine's
  own CPU kernel (vLLM's oneDNN primitive): the arithmetic a step cannot skip;
* **int8**: those products with the weights and inputs quantized to int8 (W8A8, vLLM's CPU
  kernel), at a few step sizes: what an int8 checkpoint could take off, before its accuracy;
* **memory floor**: a step over a few tokens reads every weight once, so it takes at least the
  weights' bytes over the read bandwidth measured here (a sum over 1 GiB, every thread).

    python -m bench.floor [--reps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time
from typing import Any

import torch

from service.data import load_split
from service.labels import LABEL_SETS
from service.settings import get_settings
from training.weights import int8_per_channel


def read_bandwidth(gib: float = 1.0, reps: int = 5) -> float:
    """Bytes per second that summing a large float32 tensor reads (median of ``reps``)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times)


def _linear(weight: torch.Tensor, int8: bool = False):
    """The engine's own CPU matrix product for ``weight`` (vLLM's prepacked oneDNN primitive, as
    its CPU linear layers dispatch on x86), else ``torch.nn.functional.linear``. ``int8``: the
    weight quantized per output channel and each input per token at run time, through the
    oneDNN kernel vLLM runs for W8A8 int8 checkpoints on CPU (no fallback: None if absent)."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None if int8 else (lambda x: torch.nn.functional.linear(x, weight))
    if not int8:
        handler = ops.create_onednn_mm(weight.t(), 32)
        return lambda x: ops.onednn_mm(handler, x, None)
    quantized, scale = int8_per_channel(weight)  # as `erc weights build --int8` writes them
    handler = ops.create_onednn_scaled_mm(quantized.t(), scale, torch.float32, True, False, 32)

    def product(x: torch.Tensor) -> torch.Tensor:
        # The handler reads the scales through a pointer: they must outlive it (as a layer's do).
        _ = scale
        x_q, x_s, x_zp = ops.onednn_scaled_int8_quant(x, None, None, True)
        out = torch.empty((x.size(0), handler.n), dtype=x.dtype)
        ops.onednn_scaled_mm(handler, x_q, out, x_s, x_zp, None, None)
        return out

    return product


def gemm_times(config, tokens: int, reps: int, int8: bool = False) -> list[float] | None:
    """Seconds for the matrix products alone of one step over ``tokens`` new tokens: every
    layer's projections at the model's shapes, and the output head at the last position (in
    float32 either way); no attention, norms, activations, scheduling or process hops."""
    h, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
    layers = [[(_linear(torch.randn(o, i), int8), i) for o, i in shapes] for _ in range(config.num_hidden_layers)]
    if layers[0][0][0] is None:
        return None
    head = _linear(torch.randn(config.vocab_size, h))
    inputs = {i: torch.randn(tokens, i) for _, i in shapes}
    last = torch.randn(1, h)
    times = []
    with torch.inference_mode():
        for _ in range(reps + 1):
            start = time.perf_counter()
            for layer in layers:
                for product, width in layer:
                    product(inputs[width])
            head(last)
            times.append(time.perf_counter() - start)
    return times[1:]


def prompts(settings, model_dir, count: int) -> list[str]:
    """The last turn of ``count`` MELD test dialogues of at least 8 turns, rendered by the service's
    own predictor (template, window, retrieved demonstrations: ``bench.run.service_prompts``)."""
    from bench.run import service_prompts

    dialogues = [d for d in load_split(settings.data_dir, "meld", "test", "csv") if len(d.turns) >= 8][:count]
    rendered = service_prompts(settings, model_dir, dialogues)
    return [rendered[end - 1] for end in itertools.accumulate(len(d.turns) for d in dialogues)]


def ms(times: list[float]) -> str:
    return f"{1000 * statistics.median(times):.1f} ms (min {1000 * min(times):.1f})"


async def engine_times(settings, model_dir, texts: list[str], reps: int) -> tuple[list[float], list[float], int]:
    from service.engine import Engine

    engine = Engine(settings, model_dir)
    await engine.start()
    try:
        labels = list(LABEL_SETS["meld"])
        await engine.classify(texts[:1], labels)
        cached = []
        for _ in range(reps):
            start = time.perf_counter()
            await engine.classify(texts[:1], labels)
            cached.append(time.perf_counter() - start)
        cold = []
        for text in texts[1 : reps + 1]:
            start = time.perf_counter()
            await engine.classify([text], labels)
            cold.append(time.perf_counter() - start)
        return cached, cold, settings.block_size or 32
    finally:
        await engine.shutdown()


def torch_times(model_dir, texts: list[str], block: int, reps: int) -> tuple[list[float], list[float], int, int, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.decoding import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = encode_prompt(tokenizer, texts[0])
    # vLLM reuses whole blocks and computes at least the prompt's last token.
    keep = (len(ids) - 1) // block * block
    with torch.inference_mode():
        prefix = model(torch.tensor([ids[:keep]]), use_cache=True).past_key_values
        tail = torch.tensor([ids[keep:]])
        cached = []
        for _ in range(reps + 1):
            start = time.perf_counter()
            model(tail, past_key_values=prefix, use_cache=True, logits_to_keep=1)
            cached.append(time.perf_counter() - start)
            prefix.crop(keep)  # drop the tail's entries again
        cold = []
        for text in texts[1 : reps + 2]:
            full = torch.tensor([encode_prompt(tokenizer, text)])
            start = time.perf_counter()
            model(full, logits_to_keep=1)
            cold.append(time.perf_counter() - start)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return cached[1:], cold[1:], len(ids) - keep, weights, model.config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    from service.served_model import served_model_dir

    settings = get_settings()
    model_dir = served_model_dir(settings)
    texts = prompts(settings, model_dir, args.reps + 2)
    engine_cached, engine_cold, block = asyncio.run(engine_times(settings, model_dir, texts, args.reps))
    torch_cached, torch_cold, new_tokens, weights, config = torch_times(model_dir, texts, block, args.reps)
    sizes = sorted({1, new_tokens, 128, settings.max_num_batched_tokens or 512})
    gemm = {n: (gemm_times(config, n, args.reps), gemm_times(config, n, args.reps, int8=True)) for n in sizes}
    bandwidth = read_bandwidth()
    print(f"model {model_dir.name}, float32 weights {weights / 1e6:.0f} MB; torch threads {torch.get_num_threads()}")
    print(
        f"| step | engine (service.engine) | plain PyTorch | its matrix products alone "
        f"| memory floor ({bandwidth / 1e9:.1f} GB/s read) |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| prompt cached but its last {new_tokens} tokens | {ms(engine_cached)} | {ms(torch_cached)} "
        f"| {ms(gemm[new_tokens][0])} | {1000 * weights / bandwidth:.1f} ms |"
    )
    print(f"| prompt never seen (every token) | {ms(engine_cold)} | {ms(torch_cold)} | | |")
    print()
    print("| new tokens in the step | matrix products, float32 | the same, int8 weights and inputs (W8A8) | ratio |")
    print("|---|---|---|---|")
    for tokens, (full, int8) in gemm.items():
        ratio = f"{statistics.median(full) / statistics.median(int8):.2f}x" if int8 else ""
        print(f"| {tokens} | {ms(full)} | {ms(int8) if int8 else 'no vLLM CPU kernel here'} | {ratio} |")


if __name__ == "__main__":
    main()
