"""Serving logic: request -> validate -> retrieve -> render -> engine -> parse -> respond.

Independent of HTTP: the API module wires it to routes, the evaluation command calls it
directly, so every path renders and decodes exactly the same way.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from service import calibration, metrics
from service.data import Dialogue, Turn
from service.labels import DATASET_LABEL_SET, LABEL_SETS
from service.retrieval import Demonstration, DemonstrationIndex, Retriever, parse_cpus
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

    def __init__(self, loc: Sequence[str | int], message: str, top: str = "body", kind: str = "limit_exceeded") -> None:
        super().__init__(message)
        self.loc = [top, *loc] if top != "header" else list(loc)
        self.message = message
        self.kind = kind


#: Engine priorities (lower is scheduled first): a chatbot's single utterance is not queued
#: behind a batch job's thousands.
INTERACTIVE, BATCH = 0, 1


class Classifier(Protocol):
    async def classify(
        self, prompts: Sequence[str], labels: Sequence[str], *, priority: int = INTERACTIVE
    ) -> list[list[float]]: ...


@dataclass(frozen=True)
class Item:
    """One utterance to classify: its dialogue and turn."""

    dialogue: Dialogue
    target: int


@dataclass(frozen=True)
class Scored:
    """One classified utterance: the served (calibrated) prediction, the engine's own
    distribution, and what the prompt showed."""

    prediction: Prediction
    raw: list[float]
    prompt: str
    demonstrations: list[Demonstration]


def open_indexes(settings: Settings, spec: ServingSpec) -> dict[str, DemonstrationIndex]:
    """The demonstration index of every label set of ``spec`` that uses one and whose index is
    built; a missing index leaves its label set unserved (see :class:`Predictor`)."""
    from service.retrieval import Encoder

    wanted = {entry.demonstrations.index for entry in spec.label_sets.values() if entry.demonstrations.k > 0}
    present = [name for name in sorted(wanted) if (settings.index_root / name / "manifest.json").is_file()]
    if not present:
        return {}
    encoder = Encoder.from_settings(settings)
    return {name: DemonstrationIndex(settings.index_root / name, encoder) for name in present}


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


def assemble(settings: Settings, model_dir: Path, engine: Classifier) -> "Predictor":
    """spec -> indexes -> predictor: what the API, ``erc evaluate`` and ``erc bench`` serve."""
    spec = ServingSpec.load(model_dir)
    return Predictor(settings, spec, engine, open_indexes(settings, spec))


class Predictor:
    """Classifies utterances with a model's spec, its demonstration indexes and an engine.

    A label set is served only when the model was trained on it and, if its prompts show
    demonstrations, its index is loaded: anything else would be a confident guess."""

    def __init__(
        self,
        settings: Settings,
        spec: ServingSpec,
        engine: Classifier,
        indexes: Mapping[str, DemonstrationIndex],
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.engine = engine
        self.indexes = dict(indexes)
        # One encoder serves every index (open_indexes); its calls are batched across requests.
        encoders = {id(index.encoder): index.encoder for index in self.indexes.values()}
        if len(encoders) > 1:
            raise ValueError("the demonstration indexes were loaded with different encoders")
        self.retriever = (
            Retriever(
                next(iter(encoders.values())),
                max_items=settings.encoder_max_batch,
                cpus=parse_cpus(settings.encoder_cpus) if settings.encoder_cpus else None,
                threads=settings.encoder_threads,
            )
            if encoders
            else None
        )
        self.unavailable = {name: why for name in LABEL_SETS if (why := self._why_unservable(name))}

    def _why_unservable(self, name: str) -> str | None:
        entry = self.spec.label_sets.get(name)
        if entry is None:
            trained = ", ".join(self.spec.label_sets)
            return f"the served model {self.spec.model_name} was not trained on it (it serves: {trained})"
        if entry.demonstrations.k == 0:
            return None
        index = self.indexes.get(entry.demonstrations.index)
        folder = self.settings.index_root / entry.demonstrations.index
        if index is None:
            return f"its demonstration index {folder} is missing; build it with `erc index build --dataset {name}`"
        pool = DATASET_LABEL_SET.get(index.manifest.get("dataset", ""))
        if pool != name:
            return (
                f"its demonstration index {folder} holds {pool} labels; "
                f"rebuild it with `erc index build --dataset {name}`"
            )
        return None

    @property
    def served(self) -> list[str]:
        """The label sets this predictor answers, the default first."""
        names = [n for n in self.spec.label_sets if n not in self.unavailable]
        return sorted(names, key=lambda n: n != self.spec.default_label_set)

    async def warm_up(self) -> None:
        """One classification of the default label set: the first constrained request compiles
        kernels (seconds), paid before the service reports ready."""
        name = self.served[0]
        await self.run([Item(Dialogue("warm-up", (Turn("a", "Hello!"),)), 0)], name)

    def _label_set(self, requested: str | None) -> str:
        name = requested or self.spec.default_label_set
        if name in self.unavailable:
            raise LimitError(
                ["label_set"],
                f"label set {name!r} cannot be served: {self.unavailable[name]}",
                kind="label_set_unavailable",
            )
        return name

    async def _retrieve(
        self, items: Sequence[Item], label_set: str, exclude_own: bool, priority: int
    ) -> list[list[Demonstration]]:
        demos = self.spec.label_sets[label_set].demonstrations
        if demos.k == 0:
            return [[] for _ in items]
        index = self.indexes[demos.index]
        texts = [item.dialogue.turns[item.target].text for item in items]
        own = [item.dialogue.id for item in items] if exclude_own else None
        start = time.perf_counter()
        # Embedding is CPU-bound: off the event loop, one encoder call for concurrent requests.
        found = await self.retriever.search(index, texts, demos.k, own, priority)
        metrics.RETRIEVAL_LATENCY.observe(time.perf_counter() - start)
        return found

    async def run(
        self, items: Sequence[Item], label_set: str, exclude_own: bool = False, priority: int = INTERACTIVE
    ) -> list[Scored]:
        """Classify ``items``; ``exclude_own`` keeps each item's own dialogue out of its
        demonstrations (evaluating a split that is in the pool)."""
        label_set = self._label_set(label_set)
        entry = self.spec.label_sets[label_set]
        labels = LABEL_SETS[label_set]
        demonstrations = await self._retrieve(items, label_set, exclude_own, priority)
        prompts = [
            erc_prompt(item.dialogue, item.target, labels, entry.window, [Shown(d.text, d.label) for d in demos])
            for item, demos in zip(items, demonstrations)
        ]
        started = time.perf_counter()
        distributions = await self.engine.classify(prompts, labels, priority=priority)
        metrics.ENGINE_LATENCY.observe(time.perf_counter() - started)
        results = []
        for raw, prompt, demos in zip(distributions, prompts, demonstrations):
            probs = calibration.apply(raw, entry.calibration)
            best = max(range(len(labels)), key=lambda i: probs[i])
            metrics.PREDICTIONS.labels(label_set, labels[best]).inc()
            results.append(
                Scored(Prediction(label=labels[best], scores=dict(zip(labels, probs))), list(raw), prompt, demos)
            )
        return results

    async def predict(self, request: PredictRequest) -> PredictResponse:
        check_dialogue(request.dialogue, ["dialogue"], self.settings)
        n = len(request.dialogue.turns)
        target = n - 1 if request.target is None else request.target
        if not 0 <= target < n:
            raise LimitError(["target"], f"target {target} is outside the dialogue's turns 0..{n - 1}")
        label_set = self._label_set(request.label_set)
        [scored] = await self.run([Item(to_dialogue(request.dialogue), target)], label_set)
        prompt, demos = scored.prompt, scored.demonstrations
        return PredictResponse(
            **scored.prediction.model_dump(),
            id=request.dialogue.id,
            target=target,
            label_set=label_set,
            model=self.spec.model_name,
            prompt=prompt if request.debug else None,
            demonstrations=[
                DemonstrationOut(text=d.text, label=d.label, dialogue_id=d.dialogue_id, score=d.score) for d in demos
            ]
            if request.debug
            else None,
        )

    async def predict_dialogue(self, request: PredictDialogueRequest) -> PredictDialogueResponse:
        s = self.settings
        if len(request.dialogues) > s.max_dialogues:
            raise LimitError(
                ["dialogues"],
                f"{len(request.dialogues)} dialogues exceed the limit of {s.max_dialogues} (ERC_MAX_DIALOGUES)",
            )
        total = sum(len(d.turns) for d in request.dialogues)
        if total > s.max_batch_turns:
            raise LimitError(
                ["dialogues"], f"{total} turns in all exceed the limit of {s.max_batch_turns} (ERC_MAX_BATCH_TURNS)"
            )
        for i, d in enumerate(request.dialogues):
            check_dialogue(d, ["dialogues", i], s)
        label_set = self._label_set(request.label_set)
        items = []
        for d in request.dialogues:
            dialogue = to_dialogue(d)
            items.extend(Item(dialogue, t) for t in range(len(d.turns)))
        results = iter(await self.run(items, label_set, priority=BATCH))
        return PredictDialogueResponse(
            results=[
                DialogueResult(id=d.id, predictions=[next(results).prediction for _ in d.turns])
                for d in request.dialogues
            ],
            label_set=label_set,
            model=self.spec.model_name,
        )
