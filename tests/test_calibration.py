"""Calibration: bias + temperature fitted on dev, ECE, and the erc.json that carries them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.calibration import apply, apply_many, expected_calibration_error, fit
from service.spec import Calibration, SpecError, ServingSpec


def test_ece_by_hand():
    # Two utterances at confidence 0.9 (one right) and two at 0.6 (both right), 15 bins:
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    gold = [0, 1, 0, 1]
    assert expected_calibration_error(probs, gold) == pytest.approx(0.4)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), [0]) == pytest.approx(0.0)


def test_apply_without_calibration_is_identity_and_temperature_keeps_the_argmax():
    probs = [0.7, 0.2, 0.1]
    assert apply(probs, None) == probs
    hot = apply(probs, Calibration(bias=[0, 0, 0], temperature=3.0))
    assert int(np.argmax(hot)) == 0 and hot[0] < 0.7 and sum(hot) == pytest.approx(1.0)


def _overconfident_and_skewed(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 3-label 'engine' that is overconfident and under-predicts label 2."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(3, size=n, p=[0.5, 0.2, 0.3])
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), gold] += 1.2
    logits[:, 2] -= 1.0  # the skew a bias should undo
    logits *= 3.0  # overconfidence a temperature should undo
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True), gold


def test_fit_lowers_ece_and_raises_weighted_f1_on_held_out_data():
    from sklearn.metrics import f1_score

    dev_p, dev_g = _overconfident_and_skewed(3000, 0)
    test_p, test_g = _overconfident_and_skewed(3000, 1)
    cal = fit(dev_p, dev_g.tolist(), "synthetic dev")
    after = apply_many(test_p, cal)
    assert cal.temperature > 1.5  # it found the overconfidence
    assert cal.bias[2] > cal.bias[0]  # and the under-predicted label
    assert expected_calibration_error(after, test_g) < 0.5 * expected_calibration_error(test_p, test_g)
    f1 = lambda p: f1_score(test_g, p.argmax(axis=1), average="weighted")  # noqa: E731
    assert f1(after) > f1(test_p) + 0.01


def test_single_label_set_erc_json_still_loads(tmp_path):
    (tmp_path / "erc.json").write_text(
        json.dumps(
            {
                "label_set": "meld",
                "template_version": "instructerc-v1",
                "window": 12,
                "demonstrations": {"k": 3, "index": "meld"},
                "model_name": "m",
            }
        )
    )
    spec = ServingSpec.load(tmp_path)
    assert list(spec.label_sets) == ["meld"] and spec.default_label_set == "meld"
    assert spec.label_sets["meld"].window == 12 and spec.label_sets["meld"].calibration is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"label_sets": {"meld": {}, "klingon": {}}}, "unknown label set 'klingon'"),
        ({"label_sets": {"meld": {"calibration": {"bias": [0, 0], "temperature": 1}}}}, "2 biases for 7 labels"),
        ({"label_sets": {"iemocap": {}}, "default_label_set": "meld"}, "default label set 'meld' is not among iemocap"),
        ({"label_sets": {"meld": {"calibration": {"bias": [0] * 7, "temperature": 0}}}}, "temperature"),
    ],
)
def test_bad_erc_json_names_the_problem(tmp_path, body, words):
    (tmp_path / "erc.json").write_text(json.dumps({"template_version": "instructerc-v1", **body}))
    with pytest.raises(SpecError) as info:
        ServingSpec.load(tmp_path)
    assert words in str(info.value)
