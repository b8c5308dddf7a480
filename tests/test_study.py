"""The backbone study's arithmetic: the selection rule, training throughput across a resume,
calibration cross-fitted by dialogue, and one recipe for every candidate."""

from __future__ import annotations

import numpy as np
import pytest

from training import study


def _dev(mean_calibrated: float) -> dict:
    return {"mean_calibrated_weighted_f1": mean_calibrated}


def test_the_rule_picks_the_best_calibrated_dev_f1_within_the_speed_bounds():
    speed = {
        "smollm2-135m": {"predict_p50_ms": 100.0, "dialogue_utterances_per_s": 20.0},
        "fast-but-weak": {"predict_p50_ms": 110.0, "dialogue_utterances_per_s": 19.0},
        "strong-but-slow": {"predict_p50_ms": 150.0, "dialogue_utterances_per_s": 4.9},  # 0.245x
        "strong-and-laggy": {"predict_p50_ms": 401.0, "dialogue_utterances_per_s": 10.0},  # 4.01x
        "middle": {"predict_p50_ms": 399.0, "dialogue_utterances_per_s": 5.0},  # just within both
    }
    dev = {
        "smollm2-135m": _dev(50.0),
        "fast-but-weak": _dev(45.0),
        "strong-but-slow": _dev(60.0),
        "strong-and-laggy": _dev(61.0),
        "middle": _dev(52.0),
    }
    best, why = study.pick(dev, speed)
    assert best == "middle"
    assert why["strong-but-slow"].startswith("throughput 0.245x < 0.25x")
    assert why["strong-and-laggy"].startswith("p50 4.010x > 4.0x")
    assert why["middle"].startswith("picked")
    assert why["smollm2-135m"] == "within the speed bounds"
    # The reference itself wins when nothing within the bounds beats it.
    dev["middle"] = _dev(49.0)
    assert study.pick(dev, speed)[0] == "smollm2-135m"


def test_the_reference_runs_first_and_last_and_counts_as_their_mean():
    rows = [
        {"candidate": "smollm2-135m", "predict_p50_ms": 100.0, "dialogue_utterances_per_s": 20.0},
        {"candidate": "gemma3-270m", "predict_p50_ms": 150.0, "dialogue_utterances_per_s": 12.0},
        {"candidate": "smollm2-135m", "predict_p50_ms": 120.0, "dialogue_utterances_per_s": 16.0},
    ]
    speed = study.speeds({"rows": rows})
    assert speed["smollm2-135m"] == {"predict_p50_ms": 110.0, "dialogue_utterances_per_s": 18.0}
    assert speed["gemma3-270m"] == {"predict_p50_ms": 150.0, "dialogue_utterances_per_s": 12.0}


def test_training_throughput_is_the_median_step_rate_across_a_resume():
    # Steps of 100 tokens at 1 s each, one slowed by other work (10 s), then a resumed process
    # whose clock restarts at 0.
    history = [
        {"elapsed_s": 1.0, "tokens": 100},
        {"elapsed_s": 2.0, "tokens": 100},
        {"elapsed_s": 12.0, "tokens": 100},
        {"elapsed_s": 1.0, "tokens": 100},
        {"elapsed_s": 2.0, "tokens": 100},
    ]
    assert study.tokens_per_second(history) == pytest.approx(100.0)
    assert study.tokens_per_second([]) == 0.0


def test_cross_fitted_calibration_never_sees_the_dialogues_it_calibrates():
    """A label the engine under-predicts in one fold only: a fit on that fold itself would
    correct it there; the cross-fitted one, fitted on the other fold, must not."""
    from training.evaluate import cross_fitted

    rng = np.random.default_rng(0)
    n = 400
    gold = rng.integers(0, 2, n).tolist()
    folds = [0] * (n // 2) + [1] * (n // 2)
    probs = np.where(np.eye(2)[gold] == 1, 0.7, 0.3)
    # Fold 1: every "b" utterance looks like an "a" one to the engine.
    for i in range(n // 2, n):
        if gold[i] == 1:
            probs[i] = [0.6, 0.4]
    out = cross_fitted(probs, gold, folds)
    assert out.shape == probs.shape and np.allclose(out.sum(axis=1), 1)
    fold0 = slice(0, n // 2)
    # Fold 0 was calibrated by fold 1's fit, which pushes towards "b": still right on fold 0's "b"s.
    assert (out[fold0].argmax(axis=1) == np.asarray(gold[fold0])).mean() > 0.9
    fold1 = np.arange(n // 2, n)
    # Fold 1 was calibrated by fold 0's fit, which had nothing to correct: its "b"s stay wrong.
    wrong_b = [i for i in fold1 if gold[i] == 1]
    assert all(out[i].argmax() == 0 for i in wrong_b)


def test_every_candidate_trains_one_recipe_on_its_own_base():
    configs = {c: study.candidate_config(c) for c in study.CANDIDATES}
    assert study.REFERENCE in configs and configs[study.REFERENCE].backbone is None
    assert configs["gemma3-270m"].backbone == "gemma3-270m"
    strip = {"name", "backbone"}
    recipes = {c: cfg.model_dump(exclude=strip) for c, cfg in configs.items()}
    first = recipes[study.REFERENCE]
    assert all(r == first for r in recipes.values())
    assert {m["dataset"] for m in first["mixture"]} == set(study.DATASETS)
    assert len({m["max_train_examples"] for m in first["mixture"]}) == 1
    with pytest.raises(SystemExit, match="unknown candidate"):
        study.candidate_config("gpt-5")


def test_each_ablation_arm_changes_one_lever_of_the_recipe():
    base = study.candidate_config("gemma3-270m").model_dump(exclude={"name"})
    changed = {}
    for variant in study.VARIANTS:
        arm = study.candidate_config(f"gemma3-270m+{variant}")
        assert arm.name == f"study-gemma3-270m-{variant}" and arm.backbone == "gemma3-270m"
        dumped = arm.model_dump(exclude={"name"})
        changed[variant] = {k for k in dumped if dumped[k] != base[k]}
    assert changed == {"window12": {"window"}, "same-label": {"demonstrations"}, "speaker": {"tasks"}}
    assert study.candidate_config("gemma3-270m+same-label").demonstrations.same_label
    assert study.candidate_config("gemma3-270m+window12").window == 12
    with pytest.raises(SystemExit, match="unknown candidate"):
        study.candidate_config("gemma3-270m+epochs")
