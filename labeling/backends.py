"""What labels a chunk's dialogues: the service's own predictor in this process
(:class:`InProcess`, loaded exactly as ``erc serve`` loads it) or a running service over HTTP
(:class:`Remote`, through :class:`service.client.AsyncERCClient`). Both answer per dialogue:
its predictions, or why it was not labelled (a limit, a prompt too long, the service's 422 or
500). A failure that is no fault of the dialogue (the engine died, the service stays overloaded
or unreachable, a refused key) stops the run instead: ``--resume`` continues it later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.client import RetryPolicy
from service.labels import LABEL_SETS
from service.schemas import DialogueIn


class LabelRunError(RuntimeError):
    """The run cannot go on (the service or engine is gone): what is committed stays."""


@dataclass(slots=True)
class Outcome:
    #: Per turn, an object with ``label`` and ``scores`` (the predictor's or the protocol's).
    predictions: list[Any] | None = None
    error: str | None = None
    model: str | None = None


class Backend(Protocol):
    model: str
    label_set: str

    @property
    def labels(self) -> tuple[str, ...]: ...

    async def start(self) -> None: ...

    async def label(self, dialogues: Sequence[DialogueIn]) -> list[Outcome]: ...

    async def close(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


def _dialogue_errors() -> tuple[type[Exception], ...]:
    """What one dialogue can cause, so that it alone goes to the errors file: a limit (the
    service's :class:`~service.exceptions.LimitError`, a prompt too long among them), or the
    engine's own refusal of its prompt where the engine raises one of its own types."""
    from service import engine
    from service.exceptions import LimitError

    own = (getattr(engine, name, None) for name in ("PromptTooLong", "TooMuchWork"))
    return (LimitError, *(t for t in own if isinstance(t, type) and issubclass(t, Exception)))


def _limit_reason(exc: Exception) -> str:
    loc = [str(x) for x in getattr(exc, "loc", ())]
    loc = loc[1:] if loc[:1] == ["body"] else loc
    message = getattr(exc, "message", None) or str(exc)
    return f"{'.'.join(loc)}: {message}" if loc else message


class InProcess:
    """One engine in this process, loaded by :func:`service.api.load_service` (the server's own
    loading: spec, indexes, encoder, engine, warm-up). ``fresh_process``: nothing in this process
    has run torch yet, so the engine's processes may be forked from it, as ``erc serve`` does
    (``erc label``); elsewhere (tests, a notebook, a Ray actor: see labeling/ray_job.py) they
    are spawned."""

    def __init__(self, settings: Any, label_set: str | None = None, *, fresh_process: bool = True) -> None:
        from service import start_method

        self.settings = settings.model_copy(
            update={
                "engine_start": start_method.resolve(settings.engine_start, fresh_process=fresh_process),
                # The server's admission limits share one engine among clients; here this run is
                # the only one, and its chunks are its own bound on the work in flight.
                "max_request_tokens": 1 << 40,
                "max_inflight_tokens": 1 << 40,
            }
        )
        self.requested = label_set
        self.label_set = ""
        self.model = ""
        self.state: Any = None

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(LABEL_SETS[self.label_set])

    async def start(self) -> None:
        from service.api import load_service
        from service.startup import explain
        from service.state import ServiceState

        self.state = ServiceState()
        try:
            await load_service(self.settings, self.state)
        except Exception as exc:
            # The server's own diagnosis of a failed load: what is wrong and what to do.
            failure = explain(exc)
            raise LabelRunError(f"the model could not be loaded: {failure.cause}. Fix: {failure.fix}") from exc
        predictor = self.state.predictor
        name = self.requested or predictor.spec.default_label_set
        if name not in predictor.served:
            why = predictor.unavailable.get(name, f"unknown label set; known: {', '.join(LABEL_SETS)}")
            raise LabelRunError(f"label set {name!r} cannot be served: {why}")
        self.label_set, self.model = name, predictor.spec.model_name

    async def _run(self, dialogues: Sequence[Any]) -> list[list[Any]]:
        from service.predictor import BATCH, Item

        items: list[Item] = []
        sizes: list[int] = []
        for dialogue in dialogues:
            items.extend(Item(dialogue, t) for t in range(len(dialogue.turns)))
            sizes.append(len(dialogue.turns))
        scored = iter(await self.state.predictor.run(items, self.label_set, priority=BATCH))
        return [[next(scored).prediction for _ in range(n)] for n in sizes]

    async def label(self, received: Sequence[DialogueIn]) -> list[Outcome]:
        from service.data import Dialogue, Turn
        from service.predictor import check_dialogue

        # The predictor's own dialogue type, as the HTTP layer hands it over.
        dialogues = [Dialogue(d.id or "", tuple(Turn(t.speaker, t.text) for t in d.turns)) for d in received]
        per_dialogue = _dialogue_errors()
        outcomes: list[Outcome | None] = [None] * len(dialogues)
        valid = []
        for i, d in enumerate(dialogues):
            try:
                check_dialogue(d, [], self.settings)
            except per_dialogue as exc:
                outcomes[i] = Outcome(error=_limit_reason(exc))
            else:
                valid.append(i)
        try:
            # The whole chunk in one call: one engine batch, as /predict_dialogue sends it.
            results = await self._run([dialogues[i] for i in valid])
            for i, predictions in zip(valid, results):
                outcomes[i] = Outcome(predictions, model=self.model)
        except per_dialogue:
            # One dialogue's prompt spoilt the batch: label each alone to find which.
            for i in valid:
                try:
                    [predictions] = await self._run([dialogues[i]])
                    outcomes[i] = Outcome(predictions, model=self.model)
                except per_dialogue as exc:
                    outcomes[i] = Outcome(error=_limit_reason(exc))
        return [o for o in outcomes if o is not None]

    async def close(self) -> None:
        if self.state is not None and self.state.engine is not None:
            await self.state.engine.shutdown()

    def stats(self) -> dict[str, Any]:
        return {}


class Remote:
    """A running service (or a balancer in front of several), one dialogue per
    ``/predict_dialogue`` request, at most ``concurrency`` requests in flight; 429 and 503 are
    retried by the client after ``Retry-After``, 500 is never retried."""

    #: Statuses no dialogue causes: the run stops instead of filling the errors file.
    FATAL = frozenset({401, 403, 404, 429, 503})
    #: A batch job rides out overload: a request is retried for as long as 10 minutes of
    #: refusals (429, 503) in a row, however many that takes; then the run stops (and resumes).
    RETRY = RetryPolicy(attempts=None, budget_s=600.0)

    def __init__(
        self,
        url: str,
        label_set: str | None = None,
        *,
        concurrency: int = 8,
        api_key: str | None = None,
        retry: Any = None,
        timeout: float = 150.0,
    ) -> None:
        from service.client import AsyncERCClient

        self.client = AsyncERCClient(
            url, api_key=api_key, retry=retry or self.RETRY, timeout=timeout, max_connections=concurrency
        )
        self.url = url
        self.requested = label_set
        self.semaphore = asyncio.Semaphore(concurrency)
        self.label_set = ""
        self.model = ""

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(LABEL_SETS[self.label_set])

    async def start(self) -> None:
        from service.client import ERCError

        try:
            # One small prediction: checks the key and the label set, and names the model.
            probe = await self.client.predict({"turns": [{"speaker": "a", "text": "Hello!"}]}, label_set=self.requested)
        except ERCError as exc:
            raise LabelRunError(f"{self.url}: {exc}") from None
        self.label_set, self.model = probe.label_set, probe.model

    @staticmethod
    def _reason(exc: Any) -> str:
        detail = exc.detail
        if isinstance(detail, list) and detail:
            parts = []
            for item in detail[:3]:
                loc = [str(x) for x in item.get("loc", [])]
                # ["body", "dialogues", 0, "turns", ...]: the dialogue's own fields.
                loc = loc[3:] if loc[:2] == ["body", "dialogues"] else loc
                parts.append(f"{'.'.join(loc) or 'dialogue'}: {item.get('msg')}")
            return f"HTTP {exc.status}: " + "; ".join(parts)
        return f"HTTP {exc.status}: {detail if detail is not None else exc}"

    async def _one(self, dialogue: DialogueIn) -> Outcome:
        from service.client import ERCConnectionError, ERCHTTPError

        async with self.semaphore:
            try:
                response = await self.client.predict_dialogue([dialogue], self.label_set)
            except ERCHTTPError as exc:
                if exc.status in self.FATAL:
                    raise LabelRunError(f"{self.url}: {exc}") from None
                return Outcome(error=self._reason(exc))
            except ERCConnectionError as exc:
                raise LabelRunError(f"{self.url}: {exc}") from None
        return Outcome(response.results[0].predictions, model=response.model)

    async def label(self, dialogues: Sequence[DialogueIn]) -> list[Outcome]:
        return list(await asyncio.gather(*(self._one(d) for d in dialogues)))

    async def close(self) -> None:
        await self.client.aclose()

    def stats(self) -> dict[str, Any]:
        s = self.client.stats
        return {"requests": s.requests, "retries": dict(s.retries)}
