"""How a label is written as tokens: the one definition shared by the serving engine (which
reads labels) and training (which teaches them).

A label is generated as a leading space, the label, then end-of-sequence: ``" joyful</s>"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids, exactly as the engine would tokenize the text itself."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


@dataclass(frozen=True)
class LabelCodec:
    """Token forms of one label set under one tokenizer."""

    labels: tuple[str, ...]
    #: Full target of each label: its tokens (with the leading space) then EOS.
    continuations: tuple[tuple[int, ...], ...]
    #: First token of each label when they are pairwise distinct, else ``None``.
    first_tokens: tuple[int, ...] | None

    @classmethod
    def build(cls, tokenizer: Any, labels: Sequence[str]) -> "LabelCodec":
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no end-of-sequence token")
        bodies = [tuple(tokenizer(" " + label, add_special_tokens=False)["input_ids"]) for label in labels]
        firsts = tuple(body[0] for body in bodies)
        return cls(
            labels=tuple(labels),
            continuations=tuple(body + (eos,) for body in bodies),
            first_tokens=firsts if len(set(firsts)) == len(firsts) else None,
        )

    def target(self, label: str) -> tuple[int, ...]:
        """Training target of ``label``: the tokens the engine will read it from."""
        return self.continuations[self.labels.index(label)]


def normalise(logprobs: Sequence[float]) -> list[float]:
    """Softmax over label log-probabilities: a distribution over the label set."""
    top = max(logprobs)
    if top == -math.inf:
        return [1.0 / len(logprobs)] * len(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]
