"""Training examples of the three InstructERC tasks, as token ids with their targets.

Targets are what the serving engine reads: a leading space, the label, EOS
(:class:`service.decoding.LabelCodec`). Demonstrations come from the training pool, never from
the utterance's own dialogue, and are chosen by similarity to the utterance only, as the service
chooses them. The paper's same-label demonstrations at training (``same_label``) are an opt-in
ablation: they may teach a model to copy its demonstrations, which serving cannot match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.data import Dialogue
from service.decoding import LabelCodec, encode_prompt
from service.labels import LABEL_SETS, SPEAKER_LABEL_SETS
from service.retrieval import DemonstrationIndex
from service.templates import Shown, erc_prompt, prediction_training_input, speaker_prompt


@dataclass(frozen=True)
class Example:
    task: str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    #: Gold label (ERC tasks) or speaker label, for scoring.
    label: str
    dialogue_id: str
    turn: int
    #: The label set ``label`` belongs to (ERC tasks), for per-dataset scoring of mixed runs.
    label_set: str = ""

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


#: With ``same_label``, the nearest this many times ``k`` pool utterances are searched for ones
#: that share the utterance's label.
SAME_LABEL_DEPTH = 16


def retrieve_demonstrations(
    dialogues: Sequence[Dialogue],
    index: DemonstrationIndex | None,
    k: int,
    own_split: bool,
    same_label: bool = False,
) -> dict[tuple[str, int], list[Shown]]:
    """Demonstrations of every utterance (own dialogue excluded when it is in the pool), best
    first. ``same_label`` (training only: it reads the gold label): the nearest pool utterances
    with the utterance's own label among the nearest ``SAME_LABEL_DEPTH * k``, then the nearest
    others where fewer than ``k`` share it."""
    keys = [(d.id, t) for d in dialogues for t in range(len(d.turns))]
    if index is None or k <= 0:
        return {key: [] for key in keys}
    texts = [d.turns[t].text for d in dialogues for t in range(len(d.turns))]
    own = [d.id if own_split else None for d in dialogues for _ in d.turns]
    if not same_label:
        found = index.search(texts, k, own)
        return {key: [Shown(x.text, x.label) for x in hits] for key, hits in zip(keys, found)}
    gold = [turn.label for d in dialogues for turn in d.turns]
    out = {}
    for key, label, hits in zip(keys, gold, index.search(texts, SAME_LABEL_DEPTH * k, own)):
        chosen = [x for x in hits if x.label == label][:k]
        chosen += [x for x in hits if x.label != label][: k - len(chosen)]
        out[key] = [Shown(x.text, x.label) for x in chosen]
    return out


def build_examples(
    dialogues: Sequence[Dialogue],
    dataset: str,
    tokenizer: Any,
    tasks: Sequence[str],
    window: int,
    demonstrations: dict[tuple[str, int], list[Shown]],
    max_length: int,
) -> list[Example]:
    """Examples of ``tasks`` for every utterance, in dialogue order. A prompt longer than
    ``max_length`` loses history turns (the oldest first) until it fits."""
    labels = LABEL_SETS[dataset]
    codec = LabelCodec.build(tokenizer, labels)
    speakers = SPEAKER_LABEL_SETS[dataset]
    speaker_codec = LabelCodec.build(tokenizer, speakers)
    out: list[Example] = []
    for d in dialogues:
        ids = d.speaker_indices()
        for t, turn in enumerate(d.turns):
            shown = demonstrations.get((d.id, t), [])
            for task in tasks:
                if task == "speaker":
                    if ids[t] >= len(speakers):
                        continue
                    prompt = encode_prompt(tokenizer, speaker_prompt(turn.text, speakers))
                    label = speakers[ids[t]]
                    out.append(Example(task, tuple(prompt), speaker_codec.target(label), label, d.id, t, ""))
                    continue
                render = erc_prompt if task == "erc" else prediction_training_input
                w = window
                while True:
                    prompt = encode_prompt(tokenizer, render(d, t, labels, w, shown))
                    if len(prompt) + 4 <= max_length or w == 0:
                        break
                    w -= 1
                out.append(
                    Example(
                        task, tuple(prompt[-(max_length - 4) :]), codec.target(turn.label), turn.label, d.id, t, dataset
                    )
                )
    return out
