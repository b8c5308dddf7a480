"""Prompt templates: byte-exact with the official InstructERC preprocessing."""

from __future__ import annotations

import json

import pytest

from service.data import Dialogue, Turn, load_split
from service.labels import LABEL_SETS, SPEAKER_LABEL_SETS
from service.templates import (
    Shown,
    erc_prompt,
    prediction_prompt,
    prediction_training_input,
    speaker_prompt,
)
from tests.conftest import require

MELD = LABEL_SETS["meld"]
HEAD = (
    "Now you are expert of sentiment and emotional analysis. The following conversation noted "
    "between '### ###' involves several speakers. ### "
)
MELD_Q = "from <neutral, surprise, fear, sad, joyful, disgust, angry>:"


def _reference(data_dir):
    path = require(data_dir / "reference_prompts" / "meld_window12_test_official_sample.jsonl", "reference prompts")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_golden_reference_prompts_byte_for_byte(data_dir):
    test = load_split(data_dir, "meld", "test", "cosmic")
    flat = [(d, i) for d in test for i in range(len(d.turns))]
    references = _reference(data_dir)
    assert len(references) == 7
    for ref in references:
        dialogue, turn = flat[ref["line_index"]]
        assert erc_prompt(dialogue, turn, MELD).encode("utf-8") == ref["input"].encode("utf-8")
        assert dialogue.turns[turn].label == ref["target"]
    # The 13-utterance window case is among them, and the cp1252 artefacts survive.
    assert any(ref["input"].count("\t") == 13 for ref in references)
    assert any("\x92" in ref["input"] for ref in references)


def _dialogue(n: int) -> Dialogue:
    return Dialogue("d", tuple(Turn(f"P{i % 3}", f"u{i}") for i in range(n)))


@pytest.mark.parametrize(
    ("target", "window", "first"), [(0, 12, 0), (5, 12, 0), (12, 12, 0), (13, 12, 1), (20, 12, 8), (4, 0, 4), (4, 2, 2)]
)
def test_window_edges(target, window, first):
    prompt = erc_prompt(_dialogue(25), target, MELD, window=window)
    history = prompt.split(" ### ")[1]
    turns = [t for t in history.split("\t") if t]
    assert len(turns) == target - first + 1
    assert turns[0].endswith(f'"u{first}"') and turns[-1].endswith(f'"u{target}"')


def test_target_out_of_range_is_refused():
    with pytest.raises(IndexError, match="target 3 outside 0..2"):
        erc_prompt(_dialogue(3), 3, MELD)


def test_api_speakers_named_by_first_appearance_quotes_and_unicode_kept():
    d = Dialogue(
        "x",
        (
            Turn("Zoë", 'She said "no" — ¿por qué?'),
            Turn("Al", "مرحبا 😊"),
            Turn("Zoë", "It\u2019s fine\x92"),
        ),
    )
    assert erc_prompt(d, 2, MELD) == (
        HEAD
        + '\t Speaker_0:"She said "no" — ¿por qué?"\t Speaker_1:"مرحبا 😊"\t Speaker_0:"It\u2019s fine\x92"'
        + ' ### Please select the emotional label of < Speaker_0:"It\u2019s fine\x92"> '
        + MELD_Q
    )


def test_tab_inside_text_cannot_break_the_turn_structure():
    d = Dialogue("x", (Turn("a", "one\ttwo"),))
    assert erc_prompt(d, 0, MELD).count("\t") == 1


def test_iemocap_speakers_follow_gender_not_order(data_dir):
    require(data_dir / "IEMOCAP" / "iemocap.pkl.json", "IEMOCAP data")
    d = next(d for d in load_split(data_dir, "iemocap", "test", "cosmic") if d.speaker_ids[0] == 1)
    prompt = erc_prompt(d, 0, LABEL_SETS["iemocap"])
    assert prompt.startswith(HEAD + '\t Speaker_1:"')
    assert prompt.endswith("from <happy, sad, neutral, angry, excited, frustrated>:")


def test_emorynlp_speakers_keep_stored_indices(data_dir):
    require(data_dir / "EmoryNLP" / "EmoryNLP.pkl.json", "EmoryNLP data")
    d = load_split(data_dir, "emorynlp", "train", "cosmic")[0]
    assert d.id == "1_11_4"
    prompt = erc_prompt(d, 1, LABEL_SETS["emorynlp"])
    assert prompt == (
        HEAD
        + '\t Speaker_0:"Let\'s see. Congress is debating a new deficit reduction bill... the mayor wants to raise subway fares again... the high today was forty-five... and- oh, teams played sports."'
        + '\t Speaker_1:"What about Glen? He could be a Glen."'
        + ' ### Please select the emotional label of < Speaker_1:"What about Glen? He could be a Glen."> '
        + "from <Joyful, Mad, Peaceful, Neutral, Sad, Powerful, Scared>:"
    )


TWO = Dialogue("t", (Turn("Ann", "Hi"), Turn("Bob", "Hey you")))


def test_speaker_task_golden():
    assert speaker_prompt("Hey you", SPEAKER_LABEL_SETS["meld"]) == (
        "Now you are expert of sentiment and emotional analysis. Please select the Speaker label of "
        "the utterance <Speaker: Hey you> from <Speaker_0, Speaker_1, Speaker_2, Speaker_3, "
        "Speaker_4, Speaker_5, Speaker_6, Speaker_7, Speaker_8>:"
    )
    assert speaker_prompt("x", SPEAKER_LABEL_SETS["iemocap"]).endswith("from <Speaker_0, Speaker_1>:")


def test_prediction_task_golden():
    main = (
        HEAD
        + '\t Speaker_0:"Hi"\t Speaker_1:"Hey you" ### Please select the emotional label of < Speaker_1:"Hey you"> '
        + MELD_Q
    )
    predict = (
        HEAD + '\t Speaker_0:"Hi"###Based on the above historical utterances, next utterance is spoken by <1>, '
        "please predict the emotion states of <1> " + MELD_Q
    )
    assert prediction_prompt(TWO, 1, MELD) == predict
    assert prediction_training_input(TWO, 1, MELD) == main + "***" + predict
    # Upstream's first turn has no history: the main prompt is repeated.
    first = erc_prompt(TWO, 0, MELD)
    assert prediction_training_input(TWO, 0, MELD) == first + "***" + first
    with pytest.raises(ValueError):
        prediction_prompt(TWO, 0, MELD)


def test_demonstrations_sit_between_history_and_question():
    shown = [Shown('He said "wow"', "surprise"), Shown("Ugh.", "disgust")]
    prompt = erc_prompt(TWO, 1, MELD, demonstrations=shown)
    assert prompt == (
        HEAD
        + '\t Speaker_0:"Hi"\t Speaker_1:"Hey you" ### '
        + 'Similar utterances from other conversations: "He said "wow"" is surprise; "Ugh." is disgust. '
        + 'Please select the emotional label of < Speaker_1:"Hey you"> '
        + MELD_Q
    )
    # Every utterance of a dialogue shares the prompt prefix up to its own turn (prefix caching).
    later = erc_prompt(Dialogue("t", TWO.turns + (Turn("Ann", "Bye"),)), 2, MELD, demonstrations=shown)
    assert later.startswith(HEAD + '\t Speaker_0:"Hi"\t Speaker_1:"Hey you"')
    # Demonstrations feed the prediction training input's main part only.
    assert prediction_training_input(TWO, 1, MELD, demonstrations=shown).split("***")[1] == prediction_prompt(
        TWO, 1, MELD
    )
