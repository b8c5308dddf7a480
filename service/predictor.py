"""Serving logic: request -> validate -> retrieve -> render -> engine -> parse -> respond.

Independent of HTTP: the API module wires it to routes, the evaluation command calls it
directly, so every path renders and decodes exactly the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service import metrics
from service.data import Dialogue, Turn
from service.labels import DATASET_LABEL_SET, LABEL_SETS
from service.retrieval import Demonstration, DemonstrationIndex
from service.schemas import (
    DemonstrationOut,
    DialogueIn,
    DialogueResult,
    Prediction,
    PredictDialogueRequest,
    PredictDialogueResponse,
    PredictRequest,
    PredictResponse,
)
from service.settings import Settings
from service.spec import ServingSpec
from service.templates import Shown, erc_prompt


class LimitError(ValueError):
    """A request over a configured limit; ``loc`` names the field as FastAPI's errors do."""

    def __init__(self, loc: Sequence[str | int], message: str, top: str = "body") -> None:
        super().__init__(message)
        self.loc = [top, *loc] if top != "header" else list(loc)
        self.message = message


class Classifier(Protocol):
    async def classify(self, prompts: Sequence[str], labels: Sequence[str]) -> list[list[float]]: ...


@dataclass(frozen=True)
class Item:
    """One utterance to classify: its dialogue and turn."""

    dialogue: Dialogue
    target: int


def check_dialogue(d: DialogueIn, loc: list[str | int], s: Settings) -> None:
    if len(d.turns) > s.max_turns:
        raise LimitError([*loc, "turns"], f"{len(d.turns)} turns exceed the limit of {s.max_turns} (ERC_MAX_TURNS)")
    for i, turn in enumerate(d.turns):
        if len(turn.text) > s.max_text_chars:
            raise LimitError(
                [*loc, "turns", i, "text"],
                f"{len(turn.text)} characters exceed the limit of {s.max_text_chars} (ERC_MAX_TEXT_CHARS)",
            )
        if len(turn.speaker) > s.max_speaker_chars:
            raise LimitError(
                [*loc, "turns", i, "speaker"],
                f"{len(turn.speaker)} characters exceed the limit of {s.max_speaker_chars} (ERC_MAX_SPEAKER_CHARS)",
            )


def to_dialogue(d: DialogueIn) -> Dialogue:
    return Dialogue(d.id or "", tuple(Turn(t.speaker, t.text) for t in d.turns))


class Predictor:
    """Classifies utterances with a model's spec, its demonstration index and an engine."""

    def __init__(
        self,
        settings: Settings,
        spec: ServingSpec,
        engine: Classifier,
        index: DemonstrationIndex | None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.engine = engine
        self.index = index

    def _label_set(self, requested: str | None) -> str:
        return requested or self.spec.label_set

    def _retrieves_for(self, label_set: str) -> bool:
        # Demonstrations carry their pool's labels: show them only with that label set.
        return (
            self.index is not None
            and self.spec.demonstrations.k > 0
            and DATASET_LABEL_SET.get(self.index.manifest["dataset"]) == label_set
        )

    async def _retrieve(self, items: Sequence[Item], label_set: str, exclude_own: bool) -> list[list[Demonstration]]:
        if not self._retrieves_for(label_set):
            return [[] for _ in items]
        assert self.index is not None
        texts = [item.dialogue.turns[item.target].text for item in items]
        own = [item.dialogue.id for item in items] if exclude_own else None
        start = time.perf_counter()
        # Embedding is CPU-bound: keep it off the event loop.
        found = await asyncio.to_thread(self.index.search, texts, self.spec.demonstrations.k, own)
        metrics.RETRIEVAL_LATENCY.observe(time.perf_counter() - start)
        return found

    async def run(
        self, items: Sequence[Item], label_set: str, exclude_own: bool = False
    ) -> list[tuple[Prediction, str, list[Demonstration]]]:
        """Classify ``items``; ``exclude_own`` keeps each item's own dialogue out of its
        demonstrations (evaluating a split that is in the pool)."""
        labels = LABEL_SETS[label_set]
        demonstrations = await self._retrieve(items, label_set, exclude_own)
        prompts = [
            erc_prompt(item.dialogue, item.target, labels, self.spec.window, [Shown(d.text, d.label) for d in demos])
            for item, demos in zip(items, demonstrations)
        ]
        started = time.perf_counter()
        distributions = await self.engine.classify(prompts, labels)
        metrics.ENGINE_LATENCY.observe(time.perf_counter() - started)
        results = []
        for probs, prompt, demos in zip(distributions, prompts, demonstrations):
            best = max(range(len(labels)), key=lambda i: probs[i])
            metrics.PREDICTIONS.labels(label_set, labels[best]).inc()
            results.append((Prediction(label=labels[best], scores=dict(zip(labels, probs))), prompt, demos))
        return results

    async def predict(self, request: PredictRequest) -> PredictResponse:
        check_dialogue(request.dialogue, ["dialogue"], self.settings)
        n = len(request.dialogue.turns)
        target = n - 1 if request.target is None else request.target
        if not 0 <= target < n:
            raise LimitError(["target"], f"target {target} is outside the dialogue's turns 0..{n - 1}")
        label_set = self._label_set(request.label_set)
        [(prediction, prompt, demos)] = await self.run([Item(to_dialogue(request.dialogue), target)], label_set)
        return PredictResponse(
            **prediction.model_dump(),
            id=request.dialogue.id,
            target=target,
            label_set=label_set,
            model=self.spec.model_name,
            prompt=prompt if request.debug else None,
            demonstrations=[DemonstrationOut(text=d.text, label=d.label, dialogue_id=d.dialogue_id, score=d.score) for d in demos]
            if request.debug
            else None,
        )

    async def predict_dialogue(self, request: PredictDialogueRequest) -> PredictDialogueResponse:
        s = self.settings
        if len(request.dialogues) > s.max_dialogues:
            raise LimitError(["dialogues"], f"{len(request.dialogues)} dialogues exceed the limit of {s.max_dialogues} (ERC_MAX_DIALOGUES)")
        total = sum(len(d.turns) for d in request.dialogues)
        if total > s.max_batch_turns:
            raise LimitError(["dialogues"], f"{total} turns in all exceed the limit of {s.max_batch_turns} (ERC_MAX_BATCH_TURNS)")
        for i, d in enumerate(request.dialogues):
            check_dialogue(d, ["dialogues", i], s)
        label_set = self._label_set(request.label_set)
        items = []
        for d in request.dialogues:
            dialogue = to_dialogue(d)
            items.extend(Item(dialogue, t) for t in range(len(d.turns)))
        results = iter(await self.run(items, label_set))
        return PredictDialogueResponse(
            results=[
                DialogueResult(id=d.id, predictions=[next(results)[0] for _ in d.turns]) for d in request.dialogues
            ],
            label_set=label_set,
            model=self.spec.model_name,
        )
