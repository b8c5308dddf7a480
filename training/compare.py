"""Two servable models on the same utterances: the change of weighted F1 per label set, with a
paired bootstrap interval over dialogues (the unit the splits were drawn in; an utterance's
label leans on its dialogue's other turns).

    python -m training.compare gemma3-270m-erc3b gemma3-270m-erc3c [--split test] [--out reports/compare]
    python -m training.compare gemma3-270m-erc3c gemma3-270m-erc3d --split valid --cross-fitted

Both models run through the serving path (``erc evaluate``'s, at the engine's precision), one
after the other on this host, so that a bfloat16 comparison is not a comparison of two CPUs. The
served (calibrated) labels and the engine's own (``raw``) are compared; with ``--cross-fitted``
also the labels of a calibration fitted afresh, two-fold cross-fitted by dialogue (``cross-fitted``:
each fold calibrated by a fit on the other), which is how a dev comparison sees what calibration
does to dialogues it was not fitted on (the served labels on dev are the calibration's own
training set). Each model's labels and distributions are kept in ``--out`` and reused by a later
run with the same models, split and precision.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from service.data import default_source, load_split
from service.settings import Settings
from training.card import CARD_DATASETS
from training.evaluate import cross_fitted, dialogue_folds


def paired_bootstrap(
    gold: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    dialogue_sizes: Sequence[int],
    labels: Sequence[str],
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Weighted F1 (x100) of ``second`` minus ``first`` on the same utterances (in dialogue order,
    ``dialogue_sizes`` utterances each), and its 95% interval from ``resamples`` draws of whole
    dialogues with replacement; ``p_better``: the share of draws in which ``second`` is ahead."""
    from sklearn.metrics import f1_score

    if not len(gold) == len(first) == len(second) == sum(dialogue_sizes):
        raise ValueError("gold, both label lists and the dialogue sizes must cover the same utterances")
    g, a, b = np.asarray(gold), np.asarray(first), np.asarray(second)
    starts = np.concatenate([[0], np.cumsum(dialogue_sizes)[:-1]]).astype(int)
    spans = [np.arange(s, s + n) for s, n in zip(starts, dialogue_sizes)]

    def wf1(idx: np.ndarray, predicted: np.ndarray) -> float:
        return 100 * f1_score(g[idx], predicted[idx], labels=list(labels), average="weighted", zero_division=0)

    everything = np.arange(len(g))
    whole = wf1(everything, a), wf1(everything, b)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = np.concatenate([spans[i] for i in rng.integers(0, len(spans), len(spans))])
        draws.append(wf1(idx, b) - wf1(idx, a))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {
        "first": round(whole[0], 2),
        "second": round(whole[1], 2),
        "change": round(whole[1] - whole[0], 2),
        "low": round(float(low), 2),
        "high": round(float(high), 2),
        "p_better": round(float(np.mean(np.asarray(draws) > 0)), 3),
    }


def _labels_of(model: str, split: str, settings: Settings, out: Path, distributions: bool = True) -> dict[str, Any]:
    """The model's served and raw labels on each card dataset's split (cached in ``out``, per
    precision: a float32 run must not reuse a bfloat16 run's labels). A cache without the
    distributions serves only a run that does not need them (``distributions=False``)."""
    from service.devices import resolve_dtype
    from training.evaluate import evaluate_async

    model_dir = settings.weights_root / model
    # The served labels follow the calibration in erc.json: a cache of an earlier calibration is stale.
    served_with = hashlib.sha256((model_dir / "erc.json").read_bytes()).hexdigest()
    cache = out / f"{model}-{split}-{resolve_dtype(settings.dtype)}-labels.json"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        fresh = all(r.get("erc_json_sha256") == served_with for r in cached.values())
        if fresh and (not distributions or all("distributions" in r for r in cached.values())):
            return cached
    runs = [(name, split, default_source(name)) for name in CARD_DATASETS]
    reports = asyncio.run(evaluate_async(model_dir, runs, settings, out / model))
    result: dict[str, Any] = {}
    for r in reports:
        labels = r["labels"]
        result[r["dataset"]] = {
            "labels": list(labels),
            "precision": r["precision"],
            "gold": r["gold"],
            "served": [labels[i] for i in np.asarray(r["served"]).argmax(axis=1)],
            "raw": [labels[i] for i in np.asarray(r["distributions"]).argmax(axis=1)],
            "distributions": r["distributions"],
            "erc_json_sha256": served_with,
        }
    cache.write_text(json.dumps(result))
    return result


def cross_fitted_labels(run: dict[str, Any], folds: list[int]) -> list[str]:
    """The labels of ``run``'s engine distributions under a two-fold cross-fitted calibration."""
    labels = run["labels"]
    gold = [labels.index(g) for g in run["gold"]]
    calibrated = cross_fitted(np.asarray(run["distributions"], dtype=np.float64), gold, folds)
    return [labels[i] for i in calibrated.argmax(axis=1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("first", help="a built model under ERC_WEIGHTS_ROOT (the reference)")
    parser.add_argument("second", help="a built model under ERC_WEIGHTS_ROOT (the challenger)")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("reports/compare"))
    parser.add_argument(
        "--cross-fitted",
        action="store_true",
        help="also compare the labels of a two-fold cross-fitted calibration (on dev the served ones fit dev itself)",
    )
    args = parser.parse_args(argv)
    settings = Settings()
    args.out.mkdir(parents=True, exist_ok=True)
    # Only the cross-fitted labels need the engine's distributions; an older cache without them serves the rest.
    first, second = (
        _labels_of(model, args.split, settings, args.out, distributions=args.cross_fitted)
        for model in (args.first, args.second)
    )
    kinds = ("served", "raw", "cross-fitted") if args.cross_fitted else ("served", "raw")
    for name in CARD_DATASETS:
        dialogues = load_split(settings.data_dir, name, args.split, default_source(name))
        sizes = [len(d.turns) for d in dialogues]
        a, b = first[name], second[name]
        if a["gold"] != b["gold"]:
            raise SystemExit(f"{name}: the two runs labelled different utterances")
        if args.cross_fitted:
            folds = dialogue_folds(name, dialogues)
            for run in (a, b):
                run["cross-fitted"] = cross_fitted_labels(run, folds)
        for kind in kinds:
            r = paired_bootstrap(a["gold"], a[kind], b[kind], sizes, a["labels"], args.resamples)
            print(
                f"{name} {args.split} {kind} ({a['precision']} / {b['precision']}): {args.first} {r['first']:.2f}, "
                f"{args.second} {r['second']:.2f}, change {r['change']:+.2f} (95% {r['low']:+.2f} .. "
                f"{r['high']:+.2f}), ahead in {r['p_better']:.0%} of the draws"
            )


if __name__ == "__main__":
    main()
