"""``erc evaluate``: score a servable model through the serving path (same spec, template,
retrieval, engine and constrained decoding as the HTTP service) and write a report."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from service import devices, provenance
from service.data import Dialogue, default_source, load_split
from service.evaluation import scores
from service.labels import DATASET_LABEL_SET, LABEL_SETS
from service.settings import Settings


def plot_confusion(matrix: list[list[int]], labels: tuple[str, ...], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=10)
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(
                j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > top / 2 else "black"
            )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _metrics(gold: list[str], probs: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    from service.calibration import expected_calibration_error

    predicted = [labels[i] for i in probs.argmax(axis=1)]
    result = scores(gold, predicted, labels)
    result["ece"] = expected_calibration_error(probs, [labels.index(g) for g in gold])
    result["mean_confidence"] = float(probs.max(axis=1).mean())
    return result


def dialogue_folds(dataset: str, dialogues: list[Dialogue]) -> list[int]:
    """Each utterance's fold (0 or 1) for two-fold cross-fitting: fixed per dialogue by a hash of
    ``<dataset>/<dialogue id>``, so that a dialogue's turns are never split between folds."""
    return [hashlib.sha256(f"{dataset}/{d.id}".encode()).digest()[0] % 2 for d in dialogues for _ in d.turns]


def cross_fitted(probs: np.ndarray, gold: list[int], folds: list[int]) -> np.ndarray:
    """Calibrated distributions where each fold's were calibrated (``service.calibration.fit``:
    bias and temperature, as ``erc calibrate``) by a fit on the other fold only: a calibrated dev
    figure that was not fitted on the utterances it scores."""
    from service.calibration import apply_many, fit

    out = np.empty_like(probs)
    f = np.asarray(folds)
    g = np.asarray(gold)
    for k in (0, 1):
        held = f == k
        cal = fit(probs[~held].tolist(), g[~held].tolist())
        out[held] = apply_many(probs[held], cal)
    return out


async def evaluate_async(
    model_dir: Path,
    runs: list[tuple[str, str, str]],
    settings: Settings,
    out_dir: Path,
    chunk: int = 256,
    engine: Any = None,
    limit: int | None = None,
    pick: Callable[[str, list[Dialogue]], list[Dialogue]] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate on each ``(dataset, split, source)``. ``engine``: a running engine to reuse
    (else one is started and shut down); ``limit``: only the first N dialogues of each split;
    ``pick(dataset, dialogues)``: only the dialogues it returns (the card's sample,
    training/card.py).

    The headline figures are those of the served (calibrated) distribution; ``uncalibrated``
    holds the engine's own. Each returned report also carries ``distributions`` (the engine's,
    one row per utterance) and ``gold`` for fitting a calibration, and ``served`` (the calibrated
    rows); the JSON written omits them."""
    from service.calibration import apply_many
    from service.engine import Engine
    from service.predictor import Item, assemble

    own_engine = engine is None
    if own_engine:
        engine = Engine(settings, model_dir)
    predictor = assemble(settings, model_dir, engine)
    spec, indexes = predictor.spec, predictor.indexes
    if own_engine:
        await engine.start()
    reports = []
    try:
        for dataset, split, source in runs:
            label_set = DATASET_LABEL_SET[dataset]
            dialogues = load_split(settings.data_dir, dataset, split, source)[:limit]
            if pick is not None:
                dialogues = pick(dataset, dialogues)
            items = [Item(d, t) for d in dialogues for t in range(len(d.turns))]
            gold = [d.turns[t].label for d in dialogues for t in range(len(d.turns))]
            entry = spec.label_sets.get(label_set)
            index = indexes.get(entry.demonstrations.index) if entry else None
            own = index is not None and index.manifest["dataset"] == dataset and index.manifest["split"] == split
            raw: list[list[float]] = []
            start = time.perf_counter()
            with tqdm(total=len(items), desc=f"{dataset} {split}", unit="utt", dynamic_ncols=True) as bar:
                for begin in range(0, len(items), chunk):
                    batch = items[begin : begin + chunk]
                    raw.extend(r.raw for r in await predictor.run(batch, label_set, exclude_own=own))
                    bar.update(len(batch))
            wall = time.perf_counter() - start
            labels = LABEL_SETS[label_set]
            engine_probs = np.asarray(raw, dtype=np.float64)
            calibration = entry.calibration if entry else None
            served = apply_many(engine_probs, calibration) if calibration else engine_probs
            result = _metrics(gold, served, labels)
            before = _metrics(gold, engine_probs, labels)
            report = {
                "model": spec.model_name,
                "model_dir": str(model_dir),
                "dataset": dataset,
                "split": split,
                "source": source,
                "label_set": label_set,
                "labels": list(labels),
                "calibrated": calibration is not None,
                **{
                    k: result[k]
                    for k in (
                        "count",
                        "weighted_f1",
                        "accuracy",
                        "ece",
                        "mean_confidence",
                        "per_class",
                        "confusion_matrix",
                        "predicted_counts",
                    )
                },
                "uncalibrated": {
                    k: before[k] for k in ("weighted_f1", "accuracy", "ece", "mean_confidence", "predicted_counts")
                },
                "wall_s": round(wall, 1),
                "utterances_per_s": round(len(items) / wall, 2),
                "dtype": devices.resolve_dtype(settings.dtype),
                "precision": spec.precision(devices.resolve_dtype(settings.dtype)),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "commit": provenance.commit(),
                "machine": provenance.machine(),
            }
            stem = out_dir / f"{spec.model_name}-{dataset}-{split}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
            plot_confusion(
                result["confusion_matrix"],
                labels,
                f"{spec.model_name}: {dataset} {split}, weighted F1 {result['weighted_f1']:.2f}",
                Path(f"{stem}.png"),
            )
            report["files"] = [f"{stem}.json", f"{stem}.png"]
            report["distributions"], report["gold"], report["served"] = raw, gold, served.tolist()
            reports.append(report)
    finally:
        if own_engine:
            await engine.shutdown()
    return reports


def served_runs(
    model_dir: Path, settings: Settings, splits: tuple[str, ...] = ("valid", "test"), out_of_domain: bool = True
) -> list[tuple[str, str, str]]:
    """Every split of every dataset whose label set the model serves, plus DailyDialog test
    (out of domain, MELD labels) when MELD is served and its file is present."""
    from service.spec import ServingSpec

    spec = ServingSpec.load(model_dir)
    runs = [(name, split, default_source(name)) for name in spec.label_sets for split in splits]
    if out_of_domain and "meld" in spec.label_sets and "test" in splits:
        if (settings.data_dir / "DailyDialog" / "dailydialog_test.txt").is_file():
            runs.append(("dailydialog", "test", "csv"))
    return runs


def calibrate(model_dir: Path, settings: Settings, out_dir: Path, also: list[Path] = ()) -> dict[str, Any]:
    """Fit each served label set's calibration on its dev split (through the serving path) and
    write it into ``model_dir``'s erc.json and those of ``also`` (the adapter it was merged from)."""
    from service.calibration import fit
    from service.spec import ServingSpec

    spec = ServingSpec.load(model_dir)
    runs = [(name, "valid", default_source(name)) for name in spec.label_sets]
    reports = asyncio.run(evaluate_async(model_dir, runs, settings, out_dir))
    for report in reports:
        labels = report["labels"]
        gold = [labels.index(g) for g in report["gold"]]
        spec.label_sets[report["label_set"]].calibration = fit(
            report["distributions"],
            gold,
            f"{report['dataset']} {report['split']}, {report['count']} utterances, {report['precision']} engine",
        )
    store_calibration(spec, model_dir, also)
    return {name: entry.calibration.model_dump() for name, entry in spec.label_sets.items() if entry.calibration}


def store_calibration(spec: Any, model_dir: Path, also: list[Path] = ()) -> None:
    """Write ``spec``'s calibrations (fitted on ``model_dir``) into the erc.json of ``model_dir``
    and of ``also``. A committed adapter keeps an int8 build's as its ``calibration_int8``,
    apart from the float one its float merge serves."""
    from service.spec import ServingSpec

    for folder in (model_dir, *also):
        target = ServingSpec.load(folder)
        field = "calibration_int8" if spec.quantization and folder != model_dir else "calibration"
        for name, entry in spec.label_sets.items():
            setattr(target.label_sets[name], field, entry.calibration)
        target.save(folder)


def scores_file(precision: str) -> str:
    """The file name of a card's figures measured at ``precision``: ``scores.json`` for bfloat16,
    the precision the cards were first measured in, ``scores-<precision>.json`` for any other."""
    return "scores.json" if precision == "bfloat16" else f"scores-{precision}.json"


def scores_table(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures a model card quotes, keyed ``"<dataset> <split>"`` (what the suite re-checks),
    with the engine's ``precision``: float32 and bfloat16 round differently enough to move a
    figure, so a card holds one table per precision the service serves by default."""
    (precision,) = {r["precision"] for r in reports}
    out: dict[str, Any] = {"precision": precision}
    for r in reports:
        out[f"{r['dataset']} {r['split']}"] = {
            "weighted_f1": round(r["weighted_f1"], 2),
            "accuracy": round(r["accuracy"], 2),
            "ece": round(r["ece"], 4),
            "count": r["count"],
            "per_class_f1": {k: round(v["f1"], 2) for k, v in r["per_class"].items()},
            "uncalibrated": {
                k: round(r["uncalibrated"][k], 4 if k == "ece" else 2) for k in ("weighted_f1", "accuracy", "ece")
            },
        }
    return out


def evaluate(
    model_dir: Path, runs: list[tuple[str, str, str]], settings: Settings, out_dir: Path, chunk: int = 256
) -> list[dict[str, Any]]:
    """Evaluate ``model_dir`` on each ``(dataset, split, source)`` through the serving path."""
    return asyncio.run(evaluate_async(model_dir, runs, settings, out_dir, chunk))
