"""Classification scores as InstructERC reports them (weighted F1 x 100)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any


def scores(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Weighted F1 and accuracy (x100), per-class precision/recall/F1 and the confusion matrix
    (rows: gold, columns: predicted, both in ``labels`` order)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    if len(gold) != len(predicted):
        raise ValueError("gold and predicted differ in length")
    precision, recall, f1, support = precision_recall_fscore_support(
        gold, predicted, labels=list(labels), zero_division=0
    )
    return {
        "count": len(gold),
        "weighted_f1": 100 * f1_score(gold, predicted, labels=list(labels), average="weighted", zero_division=0),
        "accuracy": 100 * accuracy_score(gold, predicted),
        "per_class": {
            label: {"precision": 100 * p, "recall": 100 * r, "f1": 100 * f, "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support)
        },
        "confusion_matrix": confusion_matrix(gold, predicted, labels=list(labels)).tolist(),
        "predicted_counts": dict(Counter(predicted)),
    }


def majority_baseline(train_labels: Sequence[str], gold: Sequence[str], labels: Sequence[str]) -> float:
    """Weighted F1 x100 of always answering the most frequent training label."""
    majority = Counter(train_labels).most_common(1)[0][0]
    return scores(gold, [majority] * len(gold), labels)["weighted_f1"]
