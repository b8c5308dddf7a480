"""A test double of the engine, for HTTP-validation tests only (the real engine is tested in
tests/test_service.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


class FakeEngine:
    """Deterministic pseudo-probabilities from the prompt's hash; records every call."""

    dead = False

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def classify(self, prompts: Sequence[str], labels: Sequence[str], decoding: str | None = None) -> list[list[float]]:
        self.calls.append(list(prompts))
        out = []
        for prompt in prompts:
            digest = hashlib.sha256(prompt.encode()).digest()
            weights = [digest[i] + 1 for i in range(len(labels))]
            out.append([w / sum(weights) for w in weights])
        return out
