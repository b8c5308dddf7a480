"""What the running service holds: the engine interface it relies on, and the state the
lifespan fills in the background while /health already answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from service.predictor import Predictor
from service.settings import Settings
from service.startup import StartupError


class ServingEngine(Protocol):
    """The engine as the HTTP layer sees it (:class:`service.engine.Engine`, or a test double)."""

    model_dir: Path

    @property
    def dead(self) -> bool: ...

    def stalled(self) -> bool: ...

    async def classify(
        self, prompts: Sequence[str], labels: Sequence[str], *, priority: int = 0
    ) -> list[list[float]]: ...

    async def shutdown(self) -> None: ...


@dataclass
class ServiceState:
    """What the lifespan has loaded so far."""

    predictor: Predictor | None = None
    engine: ServingEngine | None = None
    error: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    #: Set on SIGTERM: new work gets 503 so the balancer retries it on another replica.
    draining: bool = False
    #: Prediction requests being served now.
    inflight: int = 0
    #: Why loading failed, once it has; and who is told (``erc serve`` exits with its status).
    failure: StartupError | None = None
    on_failure: list[Callable[[StartupError], None]] = field(default_factory=list)

    def fail(self, failure: StartupError) -> None:
        self.failure = failure
        for callback in self.on_failure:
            callback(failure)

    @property
    def ready(self) -> bool:
        return self.predictor is not None and not self.dead and not self.draining

    @property
    def dead(self) -> bool:
        return self.engine is not None and self.engine.dead

    @property
    def stalled(self) -> bool:
        # Only once loaded: the warm-up request compiles kernels for tens of seconds without an
        # engine step, and a loading pod is the startup probe's business, not the liveness one's.
        return self.predictor is not None and self.engine is not None and self.engine.stalled()


#: Fills a :class:`ServiceState` (the real one loads model, indexes and engine; tests pass doubles).
Loader = Callable[[Settings, ServiceState], Awaitable[None]]
