"""Calibration of the served label distribution: a per-label bias and a temperature, fitted on a
dev split, and the expected calibration error that says whether probabilities mean what they say.

The engine's distribution ``p`` becomes ``softmax((log p + bias) / T)``. The bias is fitted first,
by coordinate ascent on weighted F1 (the metric the label is judged by); the temperature, which
cannot change the argmax, is then fitted by minimising the negative log-likelihood.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.spec import Calibration

_FLOOR = 1e-12


def apply(probs: Sequence[float], calibration: Calibration | None) -> list[float]:
    """The calibrated distribution of one engine distribution (unchanged without calibration)."""
    if calibration is None:
        return list(probs)
    return apply_many(np.asarray([probs], dtype=np.float64), calibration)[0].tolist()


def apply_many(probs: np.ndarray, calibration: Calibration) -> np.ndarray:
    logits = (np.log(np.maximum(probs, _FLOOR)) + np.asarray(calibration.bias)) / calibration.temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, gold: Sequence[int], bins: int = 15) -> float:
    """ECE of the top label over ``bins`` equal-width confidence bins (Guo et al., 2017)."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(gold)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of 0 joins the first bin.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total / len(confidence))


def _weighted_f1(predicted: np.ndarray, gold: np.ndarray, n: int) -> float:
    f1s, support = [], []
    for c in range(n):
        tp = np.sum((predicted == c) & (gold == c))
        p_count, g_count = np.sum(predicted == c), np.sum(gold == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (p_count + g_count))
        support.append(g_count)
    return float(np.dot(f1s, support) / max(1, sum(support)))


def fit_bias(log_probs: np.ndarray, gold: np.ndarray, grid: np.ndarray | None = None, rounds: int = 4) -> np.ndarray:
    """Per-label log-space offsets that maximise weighted F1, by coordinate ascent over ``grid``.
    A change is kept only when it strictly improves the score, so ties keep the zero bias."""
    grid = np.round(np.arange(-3.0, 3.0001, 0.1), 2) if grid is None else grid
    n = log_probs.shape[1]
    bias = np.zeros(n)
    best = _weighted_f1((log_probs + bias).argmax(axis=1), gold, n)
    for _ in range(rounds):
        improved = False
        for c in range(n):
            for value in grid:
                trial = bias.copy()
                trial[c] = value
                score = _weighted_f1((log_probs + trial).argmax(axis=1), gold, n)
                if score > best + 1e-12:
                    best, bias, improved = score, trial, True
        if not improved:
            break
    return bias - bias.mean()


def fit_temperature(logits: np.ndarray, gold: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``softmax(logits / T)``."""

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(log_norm - z[np.arange(len(gold)), gold]))

    candidates = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400))
    return float(min(candidates, key=nll))


def fit(probs: Sequence[Sequence[float]], gold: Sequence[int], fitted_on: str = "") -> Calibration:
    """Fit bias then temperature on engine distributions ``probs`` with gold label indices."""
    p = np.maximum(np.asarray(probs, dtype=np.float64), _FLOOR)
    g = np.asarray(gold)
    log_p = np.log(p)
    bias = fit_bias(log_p, g)
    temperature = fit_temperature(log_p + bias, g)
    return Calibration(bias=[round(float(b), 4) for b in bias], temperature=round(temperature, 4), fitted_on=fitted_on)
