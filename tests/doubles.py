"""A test double of the engine, for HTTP-validation tests only (the real engine is tested in
tests/test_service.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path


class FakeEngine:
    """Deterministic pseudo-probabilities from the prompt's hash; records every call."""

    dead = False
    model_dir = Path("fake")

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def stalled(self) -> bool:
        return False

    async def shutdown(self) -> None:
        return None

    async def classify(
        self, prompts: Sequence[str], labels: Sequence[str], decoding: str | None = None, priority: int = 0
    ) -> list[list[float]]:
        self.calls.append(list(prompts))
        out = []
        for prompt in prompts:
            digest = hashlib.sha256(prompt.encode()).digest()
            weights = [digest[i] + 1 for i in range(len(labels))]
            out.append([w / sum(weights) for w in weights])
        return out


class SlowEngine(FakeEngine):
    """Takes ``delay`` seconds per call and records calls that were cancelled (aborted)."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.cancelled = 0
        self.active = 0

    async def classify(
        self, prompts: Sequence[str], labels: Sequence[str], decoding: str | None = None, priority: int = 0
    ) -> list[list[float]]:
        import asyncio

        self.active += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1
        return await super().classify(prompts, labels, decoding, priority)
