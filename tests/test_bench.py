"""A tiny smoke run of the benchmark harness (real numbers come from `erc bench`)."""

from __future__ import annotations

from bench.launcher import free_port
from bench.run import run, unavoidable_tokens, write_report
from tests.conftest import require


def test_unavoidable_tokens_counts_what_no_earlier_prompt_shares():
    assert unavoidable_tokens([[1, 2, 3], [1, 2, 4, 5], [9], [1, 2, 3, 7]]) == [3, 2, 1, 1]


def test_harness_smoke(settings, data_dir, tmp_path):
    model = require(settings.weights_root / "base", "run `erc weights build`")
    require(settings.index_root / "meld" / "manifest.json", "run `erc index build --dataset meld`")
    # One eager engine: the harness's every figure, without a compilation or the compiled starts;
    # short probes (their figure is checked, not its precision).
    result = run(
        settings,
        model,
        dialogues=2,
        requests=4,
        levels=[1, 2],
        baseline_limit=4,
        port=free_port(),
        compile=False,
        probe_seconds=0.5,
    )
    assert result["compiled"] is False and set(result["cold_start_s"]) == {"eager"}
    assert result["utterances"] > 0 and result["predict_dialogue"]["utterances_per_s"] > 0
    assert {b["dtype"]: b["utterances"] for b in result["baselines"].values()} == {"float32": 4, "bfloat16": 4}
    assert all(result["ratio_over_baseline"][d] > 0 for d in ("float32", "bfloat16"))
    probes = result["matmul_probes_flops"]
    assert set(probes) == {"service_before", "service_after", "baselines_before", "baselines_after"}
    assert min(probes.values()) > 0 and result["probe_spread"] >= 1
    assert all(result["ratio_adjusted_for_probe"][d] > 0 for d in ("float32", "bfloat16"))
    assert result["predict_dialogue_eager"]["utterances_per_s"] > 0
    assert result["computed_tokens_per_utterance"] > 0 and result["unavoidable_tokens_per_utterance"] > 0
    assert 0 < result["flop_fraction"] and min(result["cold_start_s"].values()) > 0 and result["peak_rss_mb"] > 100
    assert [x["concurrency"] for x in result["latency"]] == [1, 2]
    md = tmp_path / "bench.md"
    write_report(result, md, tmp_path / "bench.png", "erc bench --dialogues 2")
    text = md.read_text()
    assert "ratio service / float32 baseline" in text and "erc bench --dialogues 2" in text
    # One eager engine measured: every row names it, none names a compiled engine it did not run.
    assert "a check of the harness" in text and "throughput, eager engine (`--no-compile`)" in text
    assert "compiled engine" not in text and "empty compile cache" not in text
    assert "adjusted for the machine's speed" in text and "The probe moved" in text
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_profile_summary_counts_self_and_inclusive_time(tmp_path):
    from bench.profile import summarize

    raw = tmp_path / "engine.txt"
    raw.write_text("main;forward;gemm 6\nmain;forward;rms_norm 3\nmain;sched 1\n")
    text = summarize(raw)
    assert "10 samples" in text
    assert " 60.0%  gemm" in text and " 30.0%  rms_norm" in text and " 10.0%  sched" in text
    assert " 90.0%  forward" in text  # inclusive: on 9 of the 10 sampled stacks


def test_floor_times_the_products_it_claims_to():
    """bench/floor.py's matrix products are the model's: vLLM's float32 kernel gives torch's
    product, the int8 one gives it within the quantisation error, and a step over a tiny
    Llama's shapes is timed once per repetition."""
    import torch
    from transformers import LlamaConfig

    from bench.floor import _linear, gemm_times

    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(5, 64)
    exact = torch.nn.functional.linear(x, weight)
    # From copies freed at once, as gemm_times builds them: the kernels must not read freed memory.
    full = _linear(weight.clone())
    int8 = _linear(weight.clone(), int8=True)
    _ = [torch.randn(96, 64) for _ in range(8)]
    assert torch.allclose(full(x), exact, atol=1e-4)
    if int8 is not None:  # vLLM's CPU build is installed
        error = (int8(x) - exact).abs().max() / exact.abs().max()
        assert 0 < error < 0.03, error
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2
    )
    times = gemm_times(config, tokens=3, reps=4)
    assert len(times) == 4 and min(times) > 0
