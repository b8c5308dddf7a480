"""The backbone study: each candidate backbone trained with one recipe
(``training/configs/study.toml``) on the same training examples, scored on dev through the
serving path, benchmarked in one run, and the served default picked by a written rule.

    python -m training.study train --candidate gemma3-270m [--resume]
    python -m training.study evaluate --candidate gemma3-270m
    python -m training.study train --candidate gemma3-270m+window12   # an ablation arm (VARIANTS)
    python -m training.study bench            # every trained candidate, one run, ERC_DTYPE=float32
    python -m training.study table            # docs table + the rule's pick

Runs, merges and figures go to ``runs/study/`` (built from data: never committed); the table
is written into docs/backbones.md by hand from ``runs/study/study.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from service import provenance
from service.data import default_source, load_split
from service.settings import Settings, get_settings
from training.config import TrainConfig

#: candidate -> catalogue backbone (None: the embedded SmolLM2-135M-Instruct base, weights/base).
CANDIDATES: dict[str, str | None] = {
    "smollm2-135m": None,
    "gemma3-270m": "gemma3-270m",
    "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b",
}
#: The candidate every other is measured against (today's served backbone).
REFERENCE = "smollm2-135m"
STUDY_CONFIG = Path(__file__).parent / "configs" / "study.toml"
OUT = Path("runs/study")
DATASETS = ("meld", "iemocap", "emorynlp")

#: The rule (issue 22): best mean calibrated dev weighted F1 among candidates whose
#: /predict_dialogue throughput is at least this share of the reference's ...
MIN_THROUGHPUT_RATIO = 0.25
#: ... and whose /predict p50 at concurrency 1 is at most this multiple of the reference's,
#: both measured in one run on one host with ERC_DTYPE=float32.
MAX_LATENCY_RATIO = 4.0


#: The paper's levers as ablation rows (issue 22): the study recipe with one change each, at the
#: same number of steps and examples. An arm is named ``<candidate>+<variant>``.
VARIANTS: dict[str, dict[str, Any]] = {
    # The paper's history window for every dataset (the recipe's is 8).
    "window12": {"window": 12},
    # Training examples show demonstrations of their own gold label.
    "same-label": {"demonstrations": {"same_label": True}},
    # Speaker identification mixed in: it takes its share of the same example budget.
    "speaker": {"tasks": ["erc", "speaker"]},
}


def split_arm(arm: str) -> tuple[str, str | None]:
    """``gemma3-270m+window12`` -> (``gemma3-270m``, ``window12``); a plain candidate -> (it, None)."""
    candidate, _, variant = arm.partition("+")
    if candidate not in CANDIDATES or (variant and variant not in VARIANTS):
        arms = ", ".join([*CANDIDATES, *(f"<candidate>+{v}" for v in VARIANTS)])
        raise SystemExit(f"unknown candidate {arm!r}; choose from {arms}")
    return candidate, variant or None


def run_name(arm: str) -> str:
    candidate, variant = split_arm(arm)
    return f"study-{candidate}" + (f"-{variant}" if variant else "")


def candidate_config(arm: str) -> TrainConfig:
    """The study recipe for ``arm``: only the name and the base differ between candidates; a
    variant changes one lever of :data:`VARIANTS`."""
    candidate, variant = split_arm(arm)
    config = TrainConfig.load(STUDY_CONFIG)
    change = VARIANTS[variant] if variant else {}
    if "demonstrations" in change:
        change = {**change, "demonstrations": config.demonstrations.model_copy(update=change["demonstrations"])}
    return config.model_copy(update={**change, "name": run_name(arm), "backbone": CANDIDATES[candidate]})


def run_dir(candidate: str) -> Path:
    return OUT / run_name(candidate)


def tokens_per_second(history: list[dict[str, Any]]) -> float:
    """Training prompt tokens per second: the median of the steps' own rates, so that a stretch
    of other work on the machine (or a resumed run's restarted clock) does not move it."""
    rates, last = [], 0.0
    for record in history:
        elapsed = record["elapsed_s"]
        seconds = elapsed - last if elapsed >= last else elapsed
        last = elapsed
        if seconds > 0:
            rates.append(record["tokens"] / seconds)
    return statistics.median(rates) if rates else 0.0


def train(candidate: str, settings: Settings, resume: bool) -> dict[str, Any]:
    from training.run import run

    config = candidate_config(candidate)
    # Same-label demonstrations are keyed apart in the cache: a file of their own.
    cache = OUT / ("demonstrations-same-label.json" if config.demonstrations.same_label else "demonstrations.json")
    summary = run(config, resume, settings, OUT, demonstrations_cache=cache)
    from training.trainer import latest_checkpoint

    history = json.loads((run_dir(candidate) / "summary.json").read_text())

    last = latest_checkpoint(run_dir(candidate))
    assert last is not None
    steps = json.loads((last / "history.json").read_text())
    record = {
        "candidate": candidate,
        "steps": summary["steps"],
        "train_examples": summary["train_examples"],
        "prompt_tokens": sum(r["tokens"] for r in steps),
        "tokens_per_s": round(tokens_per_second(steps), 1),
        "checkpoint": str(last),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "commit": provenance.commit(),
        "machine": provenance.machine(),
        "trainer_dev": steps[-1].get("dev_per_label_set"),
        "config": history["config"],
    }
    (run_dir(candidate) / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def merged_dir(candidate: str) -> Path:
    return run_dir(candidate) / "merged"


def merge(candidate: str, settings: Settings) -> Path:
    """The candidate's last checkpoint merged into its base: a servable folder."""
    from training.run import base_model_dir
    from training.trainer import latest_checkpoint
    from training.weights import merge_adapter

    last = latest_checkpoint(run_dir(candidate))
    if last is None:
        raise SystemExit(f"{candidate}: no checkpoint under {run_dir(candidate)}; train it first")
    base = base_model_dir(candidate_config(candidate), settings)
    return merge_adapter(base, last, merged_dir(candidate))


def evaluate(candidate: str, settings: Settings) -> dict[str, Any]:
    """All of dev of the three label sets through the serving path (engine, template, retrieval,
    constrained decoding): weighted F1 uncalibrated and calibrated (two-fold cross-fitted by
    dialogue); the calibration fitted on all of dev is stored in the merge's erc.json."""
    from service.calibration import fit
    from service.evaluation import scores
    from service.labels import DATASET_LABEL_SET, LABEL_SETS
    from service.spec import ServingSpec
    from training.evaluate import cross_fitted, dialogue_folds, evaluate_async, store_calibration

    model_dir = merged_dir(candidate)
    if not (model_dir / "erc.json").is_file():
        merge(candidate, settings)
    runs = [(name, "valid", default_source(name)) for name in DATASETS]
    reports = asyncio.run(evaluate_async(model_dir, runs, settings, run_dir(candidate) / "dev"))
    spec = ServingSpec.load(model_dir)
    out: dict[str, Any] = {"candidate": candidate, "label_sets": {}}
    for report in reports:
        dataset = report["dataset"]
        labels = LABEL_SETS[DATASET_LABEL_SET[dataset]]
        dialogues = load_split(settings.data_dir, dataset, "valid", default_source(dataset))
        folds = dialogue_folds(dataset, dialogues)
        gold = [labels.index(g) for g in report["gold"]]
        probs = np.asarray(report["distributions"], dtype=np.float64)
        calibrated = cross_fitted(probs, gold, folds)
        cal_f1 = scores(report["gold"], [labels[i] for i in calibrated.argmax(axis=1)], labels)["weighted_f1"]
        spec.label_sets[DATASET_LABEL_SET[dataset]].calibration = fit(
            probs.tolist(), gold, f"{dataset} valid, {len(gold)} utterances, {report['precision']} engine"
        )
        out["label_sets"][dataset] = {
            "count": report["count"],
            "weighted_f1": round(report["uncalibrated"]["weighted_f1"], 2),
            "calibrated_weighted_f1": round(cal_f1, 2),
            "utterances_per_s": report["utterances_per_s"],
            "precision": report["precision"],
        }
    store_calibration(spec, model_dir)
    sets = out["label_sets"].values()
    out["mean_weighted_f1"] = round(statistics.mean(s["weighted_f1"] for s in sets), 2)
    out["mean_calibrated_weighted_f1"] = round(statistics.mean(s["calibrated_weighted_f1"] for s in sets), 2)
    out.update(date=time.strftime("%Y-%m-%d", time.gmtime()), commit=provenance.commit(), machine=provenance.machine())
    (run_dir(candidate) / "dev.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def _measure(candidate: str, dialogues: list, requests: int, log: Path) -> dict[str, Any]:
    from bench.launcher import free_port
    from bench.run import Server, batch_pass, latency_level

    server = Server(free_port(), {"ERC_MODEL_DIR": str(merged_dir(candidate).resolve()), "ERC_DTYPE": "float32"})
    server.log_path = log
    try:
        ready_s = server.wait_ready(timeout=1800)
        bodies = [
            {"dialogue": {"turns": [{"speaker": t.speaker, "text": t.text} for t in d.turns]}, "target": k}
            for d in dialogues
            for k in range(len(d.turns))
        ]
        latency_level(server.base, bodies[:4], 1, 4)  # warm-up: first requests pay one-off costs
        latency = latency_level(server.base, bodies, 1, requests)
        batch = batch_pass(server, dialogues)
    finally:
        server.stop()
    return {
        "candidate": candidate,
        "ready_s": round(ready_s, 1),
        "predict_p50_ms": round(latency["p50_ms"], 1),
        "predict_p95_ms": round(latency["p95_ms"], 1),
        "dialogue_utterances_per_s": round(batch["utterances_per_s"], 2),
    }


def bench(candidates: list[str], settings: Settings, dialogues: int, requests: int) -> dict[str, Any]:
    """Every candidate's server in turn, float32, in one run; the reference first and again
    last, so the host's drift within the run shows."""
    data = load_split(settings.data_dir, "meld", "test", "csv")
    # Dialogues of 4-12 turns, from the end of the split (the card's sample takes its own).
    chosen = [d for d in reversed(data) if 4 <= len(d.turns) <= 12][:dialogues]
    order = [REFERENCE, *[c for c in candidates if c != REFERENCE], REFERENCE]
    rows = []
    for n, candidate in enumerate(order):
        row = _measure(candidate, chosen, requests, run_dir(candidate) / f"bench-{n}.log")
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "rows": rows,
        "dialogues": len(chosen),
        "utterances": sum(len(d.turns) for d in chosen),
        "requests": requests,
        "dtype": "float32",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": provenance.commit(),
        "machine": provenance.machine(),
    }
    (OUT / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def pick(dev: dict[str, dict[str, Any]], speed: dict[str, dict[str, float]]) -> tuple[str, dict[str, str]]:
    """The rule: the best mean calibrated dev weighted F1 among candidates within the speed
    bounds relative to the reference. Returns the pick and, per candidate, why it was or was not."""
    ref = speed[REFERENCE]
    why: dict[str, str] = {}
    eligible = []
    for name, s in speed.items():
        throughput = s["dialogue_utterances_per_s"] / ref["dialogue_utterances_per_s"]
        latency = s["predict_p50_ms"] / ref["predict_p50_ms"]
        if throughput < MIN_THROUGHPUT_RATIO:
            why[name] = f"throughput {throughput:.3f}x < {MIN_THROUGHPUT_RATIO}x"
        elif latency > MAX_LATENCY_RATIO:
            why[name] = f"p50 {latency:.3f}x > {MAX_LATENCY_RATIO}x"
        elif name in dev:
            eligible.append(name)
            why[name] = "within the speed bounds"
    best = max(eligible, key=lambda n: dev[n]["mean_calibrated_weighted_f1"])
    why[best] = "picked: best mean calibrated dev weighted F1 within the speed bounds"
    return best, why


def speeds(bench_result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each candidate's bench figures; the reference ran first and last: the mean of both."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in bench_result["rows"]:
        rows.setdefault(row["candidate"], []).append(row)
    return {
        name: {key: statistics.mean(r[key] for r in runs) for key in ("predict_p50_ms", "dialogue_utterances_per_s")}
        for name, runs in rows.items()
    }


def table() -> str:
    """The study's table (markdown) and the rule's pick, from runs/study/; also written to
    runs/study/study.md."""
    dev = {
        c: json.loads((run_dir(c) / "dev.json").read_text()) for c in CANDIDATES if (run_dir(c) / "dev.json").is_file()
    }
    trained = {
        c: json.loads((run_dir(c) / "train.json").read_text())
        for c in CANDIDATES
        if (run_dir(c) / "train.json").is_file()
    }
    speed = speeds(json.loads((OUT / "bench.json").read_text()))
    best, why = pick(dev, speed)
    ref = speed[REFERENCE]
    lines = [
        "| candidate | training examples (prompt tokens) | training tokens/s "
        "| dev wF1 MELD (calibrated) | IEMOCAP | EmoryNLP | mean | mean calibrated "
        "| /predict p50, c=1 | /predict_dialogue utt/s | rule |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in CANDIDATES:
        if c not in dev or c not in speed or c not in trained:
            continue
        d, s, t = dev[c], speed[c], trained[c]
        # From the checkpoint's own step records, so the figure follows tokens_per_second's rule.
        rate = tokens_per_second(json.loads((Path(t["checkpoint"]) / "history.json").read_text()))
        per = " | ".join(
            f"{d['label_sets'][ds]['weighted_f1']:.2f} ({d['label_sets'][ds]['calibrated_weighted_f1']:.2f})"
            for ds in DATASETS
        )
        latency = s["predict_p50_ms"] / ref["predict_p50_ms"]
        throughput = s["dialogue_utterances_per_s"] / ref["dialogue_utterances_per_s"]
        lines.append(
            f"| {c} | {t['train_examples']:,} ({t['prompt_tokens']:,}) | {rate:.0f} | {per} "
            f"| {d['mean_weighted_f1']:.2f} | **{d['mean_calibrated_weighted_f1']:.2f}** "
            f"| {s['predict_p50_ms']:.0f} ms ({latency:.2f}x) "
            f"| {s['dialogue_utterances_per_s']:.2f} ({throughput:.2f}x) "
            f"| {why.get(c, '')} |"
        )
    text = "\n".join(lines) + f"\n\nPicked by the rule: **{best}**.\n" + ablation_table()
    (OUT / "study.md").write_text(text)
    return text


def ablation_table() -> str:
    """The ablation rows (markdown): each trained and evaluated arm against its candidate's run."""
    lines = [
        "\n| arm | training examples (prompt tokens) | dev wF1 MELD (calibrated) | IEMOCAP | EmoryNLP "
        "| mean | mean calibrated | change in mean (calibrated) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for candidate in CANDIDATES:
        base = run_dir(candidate) / "dev.json"
        if not base.is_file():
            continue
        ref = json.loads(base.read_text())
        for variant in VARIANTS:
            arm = f"{candidate}+{variant}"
            if not (run_dir(arm) / "dev.json").is_file():
                continue
            d = json.loads((run_dir(arm) / "dev.json").read_text())
            t = json.loads((run_dir(arm) / "train.json").read_text())
            per = " | ".join(
                f"{d['label_sets'][ds]['weighted_f1']:.2f} ({d['label_sets'][ds]['calibrated_weighted_f1']:.2f})"
                for ds in DATASETS
            )
            change = d["mean_weighted_f1"] - ref["mean_weighted_f1"]
            change_cal = d["mean_calibrated_weighted_f1"] - ref["mean_calibrated_weighted_f1"]
            lines.append(
                f"| {arm} | {t['train_examples']:,} ({t['prompt_tokens']:,}) | {per} | {d['mean_weighted_f1']:.2f} "
                f"| {d['mean_calibrated_weighted_f1']:.2f} | {change:+.2f} ({change_cal:+.2f}) |"
            )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("train", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument(
            "--candidate", required=True, help="a candidate, or <candidate>+<variant>: " + ", ".join(VARIANTS)
        )
        if name == "train":
            p.add_argument("--resume", action="store_true")
    b = sub.add_parser("bench")
    b.add_argument("--candidates", default=",".join(CANDIDATES))
    b.add_argument("--dialogues", type=int, default=8)
    b.add_argument("--requests", type=int, default=40)
    sub.add_parser("table")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = get_settings()
    if args.command == "train":
        print(json.dumps(train(args.candidate, settings, args.resume), indent=1))
    elif args.command == "evaluate":
        print(json.dumps(evaluate(args.candidate, settings), indent=1))
    elif args.command == "bench":
        print(json.dumps(bench(args.candidates.split(","), settings, args.dialogues, args.requests), indent=1))
    else:
        print(table())


if __name__ == "__main__":
    main()
