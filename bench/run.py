"""``erc bench``: throughput, latency, cache reuse, FLOP efficiency, cold start and memory of
the service, side by side with the naive baseline, in one run on one machine and one model."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.launcher import ServerProcess

from service import provenance
from service.client import AsyncERCClient, ERCClient, RetryPolicy
from service.data import Dialogue, load_split
from service.settings import Settings


# --- prompts exactly as the service renders them --------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.prompts: list[str] = []

    async def classify(
        self, prompts: Sequence[str], labels: Sequence[str], decoding: str | None = None, priority: int = 0
    ) -> list[list[float]]:
        self.prompts.extend(prompts)
        return [[1.0 / len(labels)] * len(labels) for _ in prompts]


def service_prompts(settings: Settings, model_dir: Path, dialogues: Sequence[Dialogue]) -> list[str]:
    from service.predictor import Item, assemble

    recorder = _Recorder()
    predictor = assemble(settings, model_dir, recorder)
    items = [Item(Dialogue(d.id, d.turns), t) for d in dialogues for t in range(len(d.turns))]
    # The benchmark sends MELD dialogues: MELD's prompts, as the service renders them.
    asyncio.run(predictor.run(items, "meld"))
    return recorder.prompts


def unavoidable_tokens(token_lists: Sequence[Sequence[int]]) -> list[int]:
    """Per prompt, the tokens no earlier prompt shares as a prefix: what any prefix cache must
    still compute."""
    out = []
    for i, ids in enumerate(token_lists):
        best = 0
        for earlier in token_lists[max(0, i - 64) : i]:
            n = 0
            for a, b in zip(ids, earlier):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        out.append(len(ids) - best)
    return out


# --- the service under test ---------------------------------------------------------------------
class Server(ServerProcess):
    """``erc serve`` with its peak memory sampled, and its metrics parsed."""

    def __init__(self, port: int, env: dict[str, str]) -> None:
        super().__init__(port, env, sample_memory=True)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.base}/metrics", timeout=10).text):
            for s in family.samples:
                key = s.name + (
                    "" if not s.labels else "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}"
                )
                out[key] = s.value
        return out


def _sum(m: dict[str, float], prefix: str, **labels: str) -> float:
    want = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for k, v in m.items() if k.split("{")[0] == prefix and all(w in k for w in want))


def latency_level(base: str, bodies: list[dict], concurrency: int, total: int) -> dict[str, float]:
    """``total`` ``/predict`` requests of ``bodies`` (round robin) from ``concurrency`` clients at
    ``base``: latency percentiles in ms and the requests per second."""

    async def run() -> list[float]:
        latencies: list[float] = []
        queue = iter(range(total))
        # No retries: a refusal would be a figure of its own, not a slower request.
        async with AsyncERCClient(base, timeout=300, max_connections=concurrency, retry=RetryPolicy.never()) as client:

            async def worker() -> None:
                for n in queue:
                    body = bodies[n % len(bodies)]
                    start = time.perf_counter()
                    await client.predict(body["dialogue"], target=body["target"])
                    latencies.append(time.perf_counter() - start)

            began = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            latencies.append(-(time.perf_counter() - began))  # wall, marked negative
        return latencies

    values = asyncio.run(run())
    wall = -values.pop()
    values.sort()

    def pct(p: float) -> float:
        return 1000 * values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]

    return {
        "concurrency": concurrency,
        "requests": total,
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "requests_per_s": total / wall,
    }


# --- the naive baseline ---------------------------------------------------------------------------
def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def naive_baseline(
    model_dir: Path, prompts: Sequence[str], dtype: str, batch_size: int = 8, max_new_tokens: int = 3
) -> dict[str, float]:
    """InstructERC's own inference: transformers ``generate``, greedy, left-padded batches of 8,
    one prompt per utterance, nothing reused between prompts (on the GPU where there is one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = _device()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True).to(device)
            model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    wall = time.perf_counter() - start
    del model
    return {"dtype": dtype, "utterances": len(prompts), "wall_s": wall, "utterances_per_s": len(prompts) / wall}


def matmul_probe(dtype: str, seconds: float = 3.0, n: int = 2048) -> float:
    """FLOP/s of a plain square matrix multiply on this machine (same thread count as torch)."""
    import torch

    device = _device()
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    return 2 * n**3 * count / (time.perf_counter() - start)


def non_embedding_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                # An int8 build's scales are not parameters a product multiplies by.
                if "embed_tokens" not in name and "lm_head" not in name and not name.endswith("_scale"):
                    total += _prod(fh.get_slice(name).get_shape())
    return total


def _prod(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


# --- the run ----------------------------------------------------------------------------------------
def batch_pass(server: Server, data: Sequence[Dialogue]) -> dict[str, float]:
    """One ``/predict_dialogue`` of every dialogue (a cold prefix cache), with the engine's counters."""
    dialogues = [_api_dialogue(d) for d in data]
    before = server.metrics()
    with ERCClient(server.base, timeout=3600, retry=RetryPolicy.never()) as client:
        start = time.perf_counter()
        client.predict_dialogue(dialogues)
        wall = time.perf_counter() - start
    after = server.metrics()

    def delta(name: str) -> float:
        return _sum(after, name) - _sum(before, name)

    return {
        "wall_s": wall,
        "utterances_per_s": sum(len(d.turns) for d in data) / wall,
        "prompt_tokens": delta("erc_engine_prompt_tokens_total"),
        "queried": delta("erc_prefix_cache_queried_tokens_total"),
        "hits": delta("erc_prefix_cache_hit_tokens_total"),
    }


def _api_dialogue(d: Dialogue) -> dict[str, Any]:
    return {"id": d.id, "turns": [{"speaker": t.speaker, "text": t.text} for t in d.turns]}


def _label_pass(data: Sequence[Dialogue], env: dict[str, str]) -> dict[str, float]:
    """``erc label`` in-process on the same dialogues, in its own process (as a user runs it,
    its engine loaded as ``erc serve`` loads it): its labelling rate, engine loading apart."""
    import os
    import subprocess
    import sys
    import tempfile

    erc = str(Path(sys.executable).with_name("erc"))
    with tempfile.TemporaryDirectory(prefix="erc-bench-label-") as tmp:
        src, stats = Path(tmp) / "dialogues.jsonl", Path(tmp) / "stats.json"
        src.write_text("".join(json.dumps(_api_dialogue(d)) + "\n" for d in data))
        out = Path(tmp) / "labels.jsonl"
        args = [erc, "label", str(src), "-o", str(out), "--no-progress", "--stats-json", str(stats)]
        subprocess.run(args, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
        summary = json.loads(stats.read_text())
    return {k: summary[k] for k in ("utterances", "seconds", "load_seconds", "utterances_per_s")}


def _latency_levels(server: Server, data: Sequence[Dialogue], levels: Sequence[int], requests: int) -> tuple:
    """``/predict`` at each concurrency; the share of its time spent outside the engine at 8."""
    bodies = [
        {"dialogue": {"turns": [{"speaker": t.speaker, "text": t.text} for t in d.turns]}, "target": k}
        for d in data
        for k in range(len(d.turns))
    ]
    latency, overhead = [], None
    for level in levels:
        m0 = server.metrics()
        latency.append(latency_level(server.base, bodies, level, requests))
        m1 = server.metrics()
        if level == 8:
            engine = _sum(m1, "erc_engine_duration_seconds_sum") - _sum(m0, "erc_engine_duration_seconds_sum")
            total = _sum(m1, "erc_http_request_duration_seconds_sum", endpoint="/predict") - _sum(
                m0, "erc_http_request_duration_seconds_sum", endpoint="/predict"
            )
            overhead = 1 - engine / total if total else None
    return latency, overhead


def run(
    settings: Settings,
    model_dir: Path,
    dialogues: int,
    requests: int,
    levels: Sequence[int],
    baseline_limit: int | None,
    port: int,
    compile: bool = True,
    probe_seconds: float = 3.0,
) -> dict[str, Any]:
    """Three starts of the service, then the naive baseline in float32 and bfloat16:

    1. compiled engine, empty compile cache (a new machine): its cold start only;
    2. compiled engine, the cache from 1 kept (a restart, or a deployment that keeps the cache):
       its cold start, then every throughput and latency figure;
    3. eager engine (``ERC_ENFORCE_EAGER``): its cold start and batch throughput.

    ``compile=False`` starts one eager engine (2 only, no 1 or 3): a check of the harness itself,
    without the minutes a compilation takes; its figures describe no production set-up, and the
    report says so.

    The matmul probe (``probe_seconds`` each) runs before and after the measured service (2) and
    before and after the baselines: a shared machine's speed moves by the hour and within a run (docs/performance.md), so the report
    shows each phase's probe and the ratios adjusted for it next to the raw ones.
    """
    import tempfile

    from transformers import AutoTokenizer

    from service.decoding import encode_prompt
    from service.devices import resolve_dtype
    from service.spec import ServingSpec
    from service.served_model import adapter_of

    dtype = resolve_dtype(settings.dtype)  # the engine's
    precision = ServingSpec.load(model_dir).precision(dtype)
    # The naive loop a user writes runs the float checkpoint: an int8 build's is the one it came from.
    float_dir = model_dir.with_name(adapter_of(model_dir))
    data = load_split(settings.data_dir, "meld", "test", "csv")[:dialogues]
    prompts = service_prompts(settings, model_dir, data)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    token_lists = [encode_prompt(tokenizer, p) for p in prompts]
    n_utt = len(prompts)
    minimum = unavoidable_tokens(token_lists)
    cold: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="erc-bench-compile-cache-") as cache:
        env = {"ERC_MODEL_DIR": str(model_dir), "VLLM_CACHE_ROOT": cache, "ERC_ENFORCE_EAGER": str(not compile).lower()}
        if compile:
            server = Server(port, env)
            try:
                cold["compiled_empty_cache"] = server.wait_ready()
            finally:
                server.stop()
        probes = {"service_before": matmul_probe(dtype, probe_seconds)}
        server = Server(port, env)
        try:
            cold["compiled_cache_kept" if compile else "eager"] = server.wait_ready()
            batch = batch_pass(server, data)
            latency, overhead = _latency_levels(server, data, levels, requests)
            peak_mb = server.peak_mb
        finally:
            server.stop()
        probes["service_after"] = matmul_probe(dtype, probe_seconds)
        # Right after the service's batch pass, on the same dialogues and compile cache.
        labelled = _label_pass(data, env)
        if compile:
            server = Server(port, {**env, "ERC_ENFORCE_EAGER": "true"})
            try:
                cold["eager"] = server.wait_ready()
                eager = batch_pass(server, data)
            finally:
                server.stop()
        else:
            # The measured start was eager already: no compiled starts to compare it with.
            eager = batch

    baseline_prompts = prompts[:baseline_limit] if baseline_limit else prompts
    probes["baselines_before"] = matmul_probe(dtype, probe_seconds)
    baselines = {t: naive_baseline(float_dir, baseline_prompts, t) for t in ("float32", "bfloat16")}
    probes["baselines_after"] = matmul_probe(dtype, probe_seconds)
    probe = (probes["service_before"] + probes["service_after"]) / 2
    # How much faster the machine was while the service ran than while the baselines did.
    speed = probe / ((probes["baselines_before"] + probes["baselines_after"]) / 2)
    params = non_embedding_params(model_dir)
    utt_per_s = batch["utterances_per_s"]
    computed_per_utt = (batch["prompt_tokens"] - batch["hits"]) / n_utt
    achieved = 2 * params * computed_per_utt * utt_per_s
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": provenance.commit(),
        "machine": f"{provenance.machine()}, {round(_mem_gib())} GiB",
        "device": _device(),
        "model": str(model_dir),
        "dtype": dtype,
        "precision": precision,
        "compiled": compile,
        "baseline_model": str(float_dir),
        "dialogues": len(data),
        "utterances": n_utt,
        "predict_dialogue": {"wall_s": batch["wall_s"], "utterances_per_s": utt_per_s},
        "predict_dialogue_eager": {"wall_s": eager["wall_s"], "utterances_per_s": eager["utterances_per_s"]},
        "label_in_process": labelled,
        "label_over_predict_dialogue": labelled["utterances_per_s"] / utt_per_s,
        "baselines": baselines,
        "ratio_over_baseline": {d: utt_per_s / b["utterances_per_s"] for d, b in baselines.items()},
        "ratio_adjusted_for_probe": {d: utt_per_s / b["utterances_per_s"] / speed for d, b in baselines.items()},
        "matmul_probes_flops": probes,
        "probe_spread": max(probes.values()) / min(probes.values()),
        "prompt_tokens_per_utterance": sum(len(t) for t in token_lists) / n_utt,
        "engine_prompt_tokens": batch["prompt_tokens"],
        "prefix_cache_hit_rate": batch["hits"] / batch["queried"] if batch["queried"] else None,
        "computed_tokens_per_utterance": computed_per_utt,
        "unavoidable_tokens_per_utterance": sum(minimum) / n_utt,
        "computed_over_unavoidable": computed_per_utt / (sum(minimum) / n_utt),
        "non_embedding_params": params,
        "matmul_probe_flops": probe,
        "achieved_flops": achieved,
        "flop_fraction": achieved / probe,
        "overhead_fraction_at_concurrency_8": overhead,
        "latency": latency,
        "cold_start_s": cold,
        "peak_rss_mb": peak_mb,
    }


def _mem_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


def write_report(result: dict[str, Any], md: Path, png: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [x["concurrency"] for x in result["latency"]]
    fig, ax1 = plt.subplots(figsize=(6.5, 4))
    ax1.plot(levels, [x["requests_per_s"] for x in result["latency"]], "o-", label="/predict requests/s")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("concurrency")
    ax1.set_ylabel("requests/s")
    ax2 = ax1.twinx()
    for key, style in (("p50_ms", "s--"), ("p95_ms", "^--"), ("p99_ms", "v--")):
        ax2.plot(levels, [x[key] for x in result["latency"]], style, label=key.replace("_ms", ""), alpha=0.7)
    ax2.set_ylabel("latency (ms)")
    fig.legend(loc="upper left", fontsize=8)
    ax1.set_title(f"/predict on {result['machine']} ({result['date'][:10]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    r = result
    rows = "\n".join(
        f"| {x['concurrency']} | {x['requests']} | {x['requests_per_s']:.1f} | {x['p50_ms']:.0f} "
        f"| {x['p95_ms']:.0f} | {x['p99_ms']:.0f} |"
        for x in r["latency"]
    )
    hit = f"{100 * r['prefix_cache_hit_rate']:.1f}%" if r["prefix_cache_hit_rate"] is not None else "n/a"
    ovh = (
        f"{100 * r['overhead_fraction_at_concurrency_8']:.1f}%"
        if r["overhead_fraction_at_concurrency_8"] is not None
        else "n/a"
    )
    b32, b16 = r["baselines"]["float32"], r["baselines"]["bfloat16"]
    compiled = r.get("compiled", True)
    cold = {k: f"{v:.1f} s" for k, v in r["cold_start_s"].items()}
    # `--no-compile` measured one eager engine: its rows say so, and the compiled-only rows are left out.
    engine = "compiled engine" if compiled else "eager engine (`--no-compile`)"
    eager_row = (
        f"| `/predict_dialogue` throughput, eager engine (`ERC_ENFORCE_EAGER=true`) | {r['predict_dialogue_eager']['utterances_per_s']:.2f} utterances/s | |\n"
        if compiled
        else ""
    )
    cold_rows = (
        f"| cold start to `/ready`, compiled engine, compile cache kept (a restart) | {cold['compiled_cache_kept']} | <= 20 s |\n"
        f"| cold start to `/ready`, compiled engine, empty compile cache (a new machine) | {cold['compiled_empty_cache']} | |\n"
        if compiled
        else ""
    )
    at_1 = [x for x in r["latency"] if x["concurrency"] == 1]
    p50_1 = f"{at_1[0]['p50_ms']:.0f} ms" if at_1 else "not measured"
    pr = {k: v / 1e9 for k, v in r["matmul_probes_flops"].items()}
    adj = r["ratio_adjusted_for_probe"]
    drift = (
        f"The probe moved {r['probe_spread']:.2f}x within this run: ratios between phases measured at different "
        "times carry that error."
        if r["probe_spread"] > 1.15
        else f"The probe moved {r['probe_spread']:.2f}x within this run."
    )
    base = r.get("baseline_model", r["model"])
    lab = r.get("label_in_process")
    label_row = (
        f"| `erc label` in-process, the same dialogues (its own process; engine loading of {lab['load_seconds']:.1f} s apart) "
        f"| {lab['utterances_per_s']:.2f} utterances/s ({lab['seconds']:.1f} s), **{r['label_over_predict_dialogue']:.2f}x** "
        "`/predict_dialogue` | >= 0.9x |\n"
        if lab
        else ""
    )
    baseline_on = f", naive baselines on the float `{base}` it was quantized from" if base != r["model"] else ""
    smoke = (
        ""
        if compiled
        else "\n**`--no-compile`: one eager engine, a check of the harness; no figure here describes a "
        "production set-up.**\n"
    )
    md.write_text(
        f"""# Benchmarks

One run, one machine, one model: {r["machine"]}; {r["date"]}; commit `{r["commit"]}`; model
`{r["model"]}` ({r.get("precision", r["dtype"])}, on {r["device"]}){baseline_on}; MELD test, first {r["dialogues"]} dialogues ({r["utterances"]} utterances).
Reproduce with:

```bash
{command}
```
{smoke}
| measure | value | goal |
|---|---|---|
| `/predict_dialogue` throughput, {engine} | {r["predict_dialogue"]["utterances_per_s"]:.2f} utterances/s ({r["predict_dialogue"]["wall_s"]:.1f} s, cold prefix cache) | |
{eager_row}{label_row}| naive baseline, float32 (transformers `generate`, batch 8, greedy; what a CPU user runs by default) | {b32["utterances_per_s"]:.2f} utterances/s ({b32["utterances"]} utterances) | |
| naive baseline, bfloat16 | {b16["utterances_per_s"]:.2f} utterances/s ({b16["utterances"]} utterances) | |
| **ratio service / float32 baseline** | **{r["ratio_over_baseline"]["float32"]:.2f}x** | >= 6x |
| **ratio service / bfloat16 baseline** | **{r["ratio_over_baseline"]["bfloat16"]:.2f}x** | >= 4x |
| the two ratios adjusted for the machine's speed in each phase (x probe while the baselines ran / probe while the service ran) | {adj["float32"]:.2f}x and {adj["bfloat16"]:.2f}x | |
| prompt tokens per utterance (rendered) | {r["prompt_tokens_per_utterance"]:.1f} | |
| prefix-cache hit rate | {hit} | |
| prompt tokens computed per utterance | {r["computed_tokens_per_utterance"]:.1f} | |
| unavoidable minimum per utterance (tokens no earlier prompt shares) | {r["unavoidable_tokens_per_utterance"]:.1f} | |
| computed / unavoidable | {r["computed_over_unavoidable"]:.2f} | <= 1.25 |
| matmul probe ({r["dtype"]}): before / after the service, before / after the baselines | {pr["service_before"]:.0f} / {pr["service_after"]:.0f}, {pr["baselines_before"]:.0f} / {pr["baselines_after"]:.0f} GFLOP/s | |
| FLOP rate on computed tokens (2 x {r["non_embedding_params"] / 1e6:.1f}M params x tokens) | {r["achieved_flops"] / 1e9:.2f} GFLOP/s | |
| **fraction of the probe** (the mean of the two around the service) | **{100 * r["flop_fraction"]:.1f}%** | >= 60% |
| HTTP + retrieval + templating share of `/predict` time at concurrency 8 | {ovh} | < 10% |
| `/predict` p50 at concurrency 1 | {p50_1} | <= 40 ms |
{cold_rows}| cold start to `/ready`, eager engine | {cold["eager"]} | |
| peak resident memory (server and engine processes) | {r["peak_rss_mb"]:.0f} MB | |

`/predict` latency (the dialogue history is already in the prefix cache from the batch pass):

| concurrency | requests | requests/s | p50 ms | p95 ms | p99 ms |
|---|---|---|---|---|---|
{rows}

{drift}

![throughput and latency against concurrency]({png.name})

Raw figures: `{md.with_suffix(".json").name}`. Where the time goes, and what the goals missed
would take: `performance.md` (`python -m bench.floor`, `python -m bench.profile`).
"""
    )
    md.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
