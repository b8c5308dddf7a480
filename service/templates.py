"""InstructERC prompt templates: the main ERC prompt, the two auxiliary training tasks and the
retrieved-demonstration section.

The main prompt and both auxiliary tasks are byte-exact with the official InstructERC
preprocessing (``code/data_process.py``); ``tests/test_templates.py`` checks them against prompts
that preprocessing produced. The demonstration section is ours (upstream never released it).
Any change to the text here changes what a trained model sees: bump :data:`TEMPLATE_VERSION`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.data import Dialogue

#: Recorded in every servable model's ``erc.json``; the service refuses a model whose version
#: differs, so a model is always served with the template it was trained with.
TEMPLATE_VERSION = "instructerc-v1"

#: The official default history: the 12 utterances before the target (plus the target).
DEFAULT_WINDOW = 12

_EXPERT = "Now you are expert of sentiment and emotional analysis. "
_INTRO = "The following conversation noted between '### ###' involves several speakers. ### "
_DEMO_INTRO = "Similar utterances from other conversations: "


@dataclass(frozen=True, slots=True)
class Shown:
    """A labelled utterance shown to the model as a demonstration."""

    text: str
    label: str


def _clean(text: str) -> str:
    # A tab separates turns in the prompt (upstream even splits on it to find the target), so a
    # tab inside an utterance would corrupt the prompt. No dataset text holds one; API text may.
    return text.replace("\t", " ")


def _turn(speaker_id: int, text: str) -> str:
    return f'\t Speaker_{speaker_id}:"{_clean(text)}"'


def _history(dialogue: Dialogue, target: int, window: int) -> list[str]:
    if not 0 <= target < len(dialogue.turns):
        raise IndexError(f"target {target} outside 0..{len(dialogue.turns) - 1}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    ids = dialogue.speaker_indices()
    start = max(target - window, 0)
    return [_turn(ids[i], dialogue.turns[i].text) for i in range(start, target + 1)]


def demonstration_section(demonstrations: Sequence[Shown]) -> str:
    """The retrieved-demonstration section, placed between the history and the question so that
    every utterance of a dialogue shares the prompt prefix up to its own turn."""
    if not demonstrations:
        return ""
    shown = "; ".join(f'"{_clean(d.text)}" is {d.label}' for d in demonstrations)
    return f"{_DEMO_INTRO}{shown}. "


def erc_prompt(
    dialogue: Dialogue,
    target: int,
    labels: Sequence[str],
    window: int = DEFAULT_WINDOW,
    demonstrations: Sequence[Shown] = (),
) -> str:
    """The main InstructERC prompt for turn ``target`` of ``dialogue``."""
    turns = _history(dialogue, target, window)
    # Upstream takes the target as the text after the last tab, leading space included.
    target_turn = turns[-1][1:]
    return (
        _EXPERT
        + _INTRO
        + "".join(turns)
        + " ### "
        + demonstration_section(demonstrations)
        + f"Please select the emotional label of <{target_turn}> from <{', '.join(labels)}>:"
    )


def prediction_prompt(dialogue: Dialogue, target: int, labels: Sequence[str], window: int = DEFAULT_WINDOW) -> str:
    """The emotion-prediction prompt: the history *before* ``target`` only, and the question of
    which emotion its speaker will show next. Upstream defines it for ``target > 0``."""
    if target == 0:
        raise ValueError("the prediction prompt needs at least one earlier turn")
    speaker = dialogue.speaker_indices()[target]
    history = _history(dialogue, target, window)[:-1]
    return (
        _EXPERT
        + _INTRO
        + "".join(history)
        + "###"
        + f"Based on the above historical utterances, next utterance is spoken by <{speaker}>, "
        + f"please predict the emotion states of <{speaker}> from <{', '.join(labels)}>:"
    )


def prediction_training_input(
    dialogue: Dialogue,
    target: int,
    labels: Sequence[str],
    window: int = DEFAULT_WINDOW,
    demonstrations: Sequence[Shown] = (),
) -> str:
    """The official emotion-prediction training input: the main prompt, ``***``, then the
    prediction prompt (for the first turn, which has no history, the main prompt again).
    Its target is the current turn's label."""
    main = erc_prompt(dialogue, target, labels, window, demonstrations)
    second = main if target == 0 else prediction_prompt(dialogue, target, labels, window)
    return f"{main}***{second}"


def speaker_prompt(text: str, speaker_labels: Sequence[str]) -> str:
    """The speaker-identification prompt; its target is ``Speaker_N``."""
    return (
        _EXPERT
        + f"Please select the Speaker label of the utterance <Speaker: {_clean(text)}> "
        + f"from <{', '.join(speaker_labels)}>:"
    )
