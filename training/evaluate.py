"""``erc evaluate``: score a servable model through the serving path (same spec, template,
retrieval, engine and constrained decoding as the HTTP service) and write a report."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from service import provenance
from service.data import load_split
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
            ax.text(j, i, str(value), ha="center", va="center", fontsize=8, color="white" if value > top / 2 else "black")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def evaluate_async(
    model_dir: Path,
    runs: list[tuple[str, str, str]],
    settings: Settings,
    out_dir: Path,
    chunk: int = 256,
    engine: Any = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Evaluate on each ``(dataset, split, source)``. ``engine``: a running engine to reuse
    (else one is started and shut down); ``limit``: only the first N dialogues of each split."""
    from service.engine import Engine
    from service.predictor import Item, Predictor
    from service.retrieval import DemonstrationIndex, Encoder
    from service.spec import ServingSpec

    spec = ServingSpec.load(model_dir)
    index = None
    if spec.demonstrations.k > 0:
        index = DemonstrationIndex(settings.index_root / spec.demonstrations.index, Encoder.from_settings(settings))
    own_engine = engine is None
    if own_engine:
        engine = Engine(settings, model_dir)
        await engine.start()
    predictor = Predictor(settings, spec, engine, index)
    reports = []
    try:
        for dataset, split, source in runs:
            label_set = DATASET_LABEL_SET[dataset]
            dialogues = load_split(settings.data_dir, dataset, split, source)[:limit]
            items = [Item(d, t) for d in dialogues for t in range(len(d.turns))]
            gold = [d.turns[t].label for d in dialogues for t in range(len(d.turns))]
            own = index is not None and index.manifest["dataset"] == dataset and index.manifest["split"] == split
            predicted: list[str] = []
            start = time.perf_counter()
            with tqdm(total=len(items), desc=f"{dataset} {split}", unit="utt", dynamic_ncols=True) as bar:
                for begin in range(0, len(items), chunk):
                    batch = items[begin:begin + chunk]
                    results = await predictor.run(batch, label_set, exclude_own=own)
                    predicted.extend(r[0].label for r in results)
                    bar.update(len(batch))
            wall = time.perf_counter() - start
            labels = LABEL_SETS[label_set]
            result = scores(gold, predicted, labels)
            report = {
                "model": spec.model_name,
                "model_dir": str(model_dir),
                "dataset": dataset,
                "split": split,
                "source": source,
                "label_set": label_set,
                "labels": list(labels),
                **{k: result[k] for k in ("count", "weighted_f1", "accuracy", "per_class", "confusion_matrix", "predicted_counts")},
                "wall_s": round(wall, 1),
                "utterances_per_s": round(len(items) / wall, 2),
                "dtype": settings.dtype,
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "commit": provenance.commit(),
                "machine": provenance.machine(),
            }
            stem = out_dir / f"{spec.model_name}-{dataset}-{split}"
            stem.parent.mkdir(parents=True, exist_ok=True)
            Path(f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
            plot_confusion(result["confusion_matrix"], labels, f"{spec.model_name}: {dataset} {split}, weighted F1 {result['weighted_f1']:.2f}", Path(f"{stem}.png"))
            report["files"] = [f"{stem}.json", f"{stem}.png"]
            reports.append(report)
    finally:
        if own_engine:
            await engine.shutdown()
    return reports


def evaluate(model_dir: Path, dataset: str, split: str, source: str, settings: Settings, out_dir: Path, out_of_domain: bool = True, chunk: int = 256) -> list[dict[str, Any]]:
    """Evaluate ``model_dir`` on ``dataset``/``split``; with ``out_of_domain`` and a MELD model,
    also on DailyDialog test (labels mapped onto MELD's)."""
    runs = [(dataset, split, source)]
    if out_of_domain and DATASET_LABEL_SET[dataset] == "meld" and dataset != "dailydialog":
        if (settings.data_dir / "DailyDialog" / "dailydialog_test.txt").is_file():
            runs.append(("dailydialog", "test", "csv"))
    return asyncio.run(evaluate_async(model_dir, runs, settings, out_dir, chunk))
