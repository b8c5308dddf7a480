"""Demonstration retrieval: own dialogue excluded, manifest checked, deterministic."""

from __future__ import annotations

import json

import pytest

from service.data import Dialogue, Turn
from service.retrieval import DemonstrationIndex, RetrievalError, build_index, vote


def _pool() -> list[Dialogue]:
    return [
        Dialogue("a", (Turn("x", "I am so happy today!", "joyful"), Turn("y", "The train leaves at noon.", "neutral"))),
        Dialogue("b", (Turn("x", "I am really happy today!", "joyful"), Turn("y", "That is disgusting.", "disgust"))),
        Dialogue("c", (Turn("x", "You make me furious!", "angry"), Turn("y", "I'm scared of the dark.", "fear"))),
    ]


@pytest.fixture
def small_index(tmp_path, encoder):
    folder = tmp_path / "small"
    build_index(
        _pool(), encoder, folder, dataset="meld", split="train", source="csv", data_checksum="sha256:x", progress=False
    )
    return DemonstrationIndex(folder, encoder)


def test_manifest_records_what_was_built(small_index, encoder):
    m = small_index.manifest
    assert (m["dataset"], m["split"], m["count"], m["dialogues"]) == ("meld", "train", 6, 3)
    assert m["encoder"] == encoder.identity and m["encoder"]["dimension"] == 384
    assert m["data_checksum"] == "sha256:x" and m["built_at"]


def test_top_k_by_cosine_and_own_dialogue_excluded(small_index):
    [hits] = small_index.search(["I am so happy today!"], 2)
    assert [h.dialogue_id for h in hits] == ["a", "b"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].score > hits[1].score
    [hits] = small_index.search(["I am so happy today!"], 2, ["a"])
    assert all(h.dialogue_id != "a" for h in hits)
    assert hits[0].text == "I am really happy today!"


def test_search_is_deterministic(small_index):
    queries = ["so angry", "happy times", "what time is it"]
    assert small_index.search(queries, 3) == small_index.search(queries, 3)


def test_manifest_mismatch_is_refused(tmp_path, small_index, encoder):
    manifest = small_index.folder / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["encoder"]["fingerprint"] = "0" * 16
    manifest.write_text(json.dumps(doc))
    with pytest.raises(RetrievalError, match="built with encoder.*rebuild"):
        DemonstrationIndex(small_index.folder, encoder)


def test_missing_index_says_how_to_build(tmp_path, encoder):
    with pytest.raises(RetrievalError, match="erc index build --dataset nothing"):
        DemonstrationIndex(tmp_path / "nothing", encoder)


def test_vote_majority_then_nearest():
    from service.retrieval import Demonstration as D

    assert vote([D("", "sad", "", ""), D("", "joyful", "", ""), D("", "joyful", "", "")]) == "joyful"
    assert vote([D("", "sad", "", ""), D("", "joyful", "", "")]) == "sad"


def test_meld_index_never_returns_own_dialogue(meld_index):
    train_ids = sorted({p.dialogue_id for p in meld_index.pool})[:20]
    texts = [next(p.text for p in meld_index.pool if p.dialogue_id == d) for d in train_ids]
    for own, hits in zip(train_ids, meld_index.search(texts, 10, train_ids)):
        assert len(hits) == 10 and all(h.dialogue_id != own for h in hits)


def test_encoder_device_follows_the_settings(settings):
    import torch

    from service.retrieval import Encoder

    torch_cpu = {"encoder_backend": "torch", "encoder_threads": 0}
    auto = Encoder.from_settings(settings.model_copy(update={"encoder_device": "auto", **torch_cpu}))
    assert auto.model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = Encoder.from_settings(settings.model_copy(update={"encoder_device": "cpu", **torch_cpu}))
    assert cpu.model.device.type == "cpu"
    with pytest.raises(ValueError, match="encoder_device"):
        type(settings)(encoder_device="tpu")
