"""Serving logic: dialogue -> limits -> label set -> retrieve -> render -> engine -> calibrate.

Independent of HTTP: it takes and returns its own types (:class:`~service.data.Dialogue` in,
:class:`Answer` and :class:`DialoguesAnswer` out) and raises the service's errors
(:mod:`service.exceptions`). :mod:`service.routes.predict` translates the protocol
(:mod:`service.schemas`) to and from them, and ``erc evaluate`` calls :meth:`Predictor.run`
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
from service.exceptions import LabelSetUnavailable, LimitError
from service.retrieval import Demonstration, DemonstrationIndex, Retriever, parse_cpus
from service.settings import Settings
from service.spec import LabelSetSpec, ServingSpec
from service.templates import Shown, erc_prompt


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
class Prediction:
    """The served label of one utterance and the (calibrated) probability of every label."""

    label: str
    scores: dict[str, float]


@dataclass(frozen=True)
class Scored:
    """One classified utterance: the served (calibrated) prediction, the engine's own
    distribution, and what the prompt showed."""

    prediction: Prediction
    raw: list[float]
    prompt: str
    demonstrations: list[Demonstration]


@dataclass(frozen=True)
class LabelSet:
    """A label set resolved for one request: its name, its labels, and how the model serves it."""

    name: str
    labels: tuple[str, ...]
    spec: LabelSetSpec


@dataclass(frozen=True)
class Answer:
    """One utterance classified (``/predict``)."""

    scored: Scored
    target: int
    label_set: str
    model: str


@dataclass(frozen=True)
class DialoguesAnswer:
    """Every utterance of every dialogue classified (``/predict_dialogue``): one list of
    predictions per dialogue, in turn order."""

    predictions: list[list[Prediction]]
    label_set: str
    model: str


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


def check_dialogue(dialogue: Dialogue, field: Sequence[str | int], s: Settings) -> None:
    """Raise :class:`LimitError` when ``dialogue`` (at ``field`` in the request) is over the
    turn, text or speaker limits of ``s``."""
    if len(dialogue.turns) > s.max_turns:
        raise LimitError(
            f"{len(dialogue.turns)} turns exceed the limit of {s.max_turns} (ERC_MAX_TURNS)", (*field, "turns")
        )
    for i, turn in enumerate(dialogue.turns):
        if len(turn.text) > s.max_text_chars:
            raise LimitError(
                f"{len(turn.text)} characters exceed the limit of {s.max_text_chars} (ERC_MAX_TEXT_CHARS)",
                (*field, "turns", i, "text"),
            )
        if len(turn.speaker) > s.max_speaker_chars:
            raise LimitError(
                f"{len(turn.speaker)} characters exceed the limit of {s.max_speaker_chars} (ERC_MAX_SPEAKER_CHARS)",
                (*field, "turns", i, "speaker"),
            )


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

    def label_set(self, requested: str | None) -> LabelSet:
        """``requested`` (default: the model's) resolved, or :class:`LabelSetUnavailable`
        saying why this model cannot serve it."""
        name = requested or self.spec.default_label_set
        if name in self.unavailable:
            raise LabelSetUnavailable(f"label set {name!r} cannot be served: {self.unavailable[name]}")
        return LabelSet(name, LABEL_SETS[name], self.spec.label_sets[name])

    async def _retrieve(
        self, items: Sequence[Item], label_set: LabelSet, exclude_own: bool, priority: int
    ) -> list[list[Demonstration]]:
        demos = label_set.spec.demonstrations
        if demos.k == 0:
            return [[] for _ in items]
        assert self.retriever is not None  # a label set with demonstrations is served only with its index
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
        """Classify ``items`` in ``label_set``; ``exclude_own`` keeps each item's own dialogue
        out of its demonstrations (evaluating a split that is in the pool)."""
        return await self._classify(items, self.label_set(label_set), exclude_own, priority)

    async def _classify(
        self, items: Sequence[Item], label_set: LabelSet, exclude_own: bool = False, priority: int = INTERACTIVE
    ) -> list[Scored]:
        labels, entry = label_set.labels, label_set.spec
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
            metrics.PREDICTIONS.labels(label_set.name, labels[best]).inc()
            results.append(Scored(Prediction(labels[best], dict(zip(labels, probs))), list(raw), prompt, demos))
        return results

    async def predict(self, dialogue: Dialogue, target: int | None = None, label_set: str | None = None) -> Answer:
        """Classify one turn of ``dialogue`` (default: its last) after checking the limits."""
        check_dialogue(dialogue, ("dialogue",), self.settings)
        n = len(dialogue.turns)
        target = n - 1 if target is None else target
        if not 0 <= target < n:
            raise LimitError(f"target {target} is outside the dialogue's turns 0..{n - 1}", ("target",))
        resolved = self.label_set(label_set)
        [scored] = await self._classify([Item(dialogue, target)], resolved)
        return Answer(scored, target, resolved.name, self.spec.model_name)

    async def predict_dialogues(self, dialogues: Sequence[Dialogue], label_set: str | None = None) -> DialoguesAnswer:
        """Classify every turn of every dialogue in one engine batch (at batch priority), after
        checking the limits."""
        s = self.settings
        if len(dialogues) > s.max_dialogues:
            raise LimitError(
                f"{len(dialogues)} dialogues exceed the limit of {s.max_dialogues} (ERC_MAX_DIALOGUES)",
                ("dialogues",),
            )
        total = sum(len(d.turns) for d in dialogues)
        if total > s.max_batch_turns:
            raise LimitError(
                f"{total} turns in all exceed the limit of {s.max_batch_turns} (ERC_MAX_BATCH_TURNS)", ("dialogues",)
            )
        for i, d in enumerate(dialogues):
            check_dialogue(d, ("dialogues", i), s)
        resolved = self.label_set(label_set)
        items = [Item(d, t) for d in dialogues for t in range(len(d.turns))]
        results = iter(await self._classify(items, resolved, priority=BATCH))
        return DialoguesAnswer(
            [[next(results).prediction for _ in d.turns] for d in dialogues], resolved.name, self.spec.model_name
        )
