"""Coalescing concurrent calls into one batch on one worker thread.

:class:`MicroBatcher` runs ``fn(items) -> results`` (one result per item, in order) on a single
dedicated thread, off the event loop. A call that arrives while the thread is idle starts a batch
at the end of the current event-loop tick (so calls made in the same tick share it); calls that
arrive while a batch runs wait and all go into the next one. Lower ``priority`` values are served
first and a batch holds at most ``max_items`` items, so a long call (a 2,000-turn
``/predict_dialogue``) is cut into chunks between which interactive calls get their turn. Each
caller gets its own results, in order; an exception raised by ``fn`` reaches every caller whose
items were in that batch; a cancelled caller's items that have not started are dropped.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(order=True)
class _Call:
    priority: int
    seq: int
    items: list[Any] = field(compare=False)
    future: asyncio.Future = field(compare=False)
    results: list[Any] = field(default_factory=list, compare=False)
    taken: int = field(default=0, compare=False)


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        *,
        max_items: int = 64,
        name: str = "batcher",
        initializer: Callable[[], None] | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be at least 1")
        self.fn = fn
        self.max_items = max_items
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=initializer)
        self._pending: list[_Call] = []
        self._busy = False
        self._seq = itertools.count()
        #: Items per call of ``fn`` so far (for tests and metrics).
        self.batch_sizes: list[int] = []

    async def submit(self, items: Sequence[T], priority: int = 0) -> list[R]:
        if not items:
            return []
        loop = asyncio.get_running_loop()
        call = _Call(priority, next(self._seq), list(items), loop.create_future())
        self._pending.append(call)
        if not self._busy:
            self._busy = True
            loop.call_soon(self._start, loop)
        return await call.future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = sorted(c for c in self._pending if not c.future.done())
        batch: list[tuple[_Call, int, int]] = []
        room = self.max_items
        for call in self._pending:
            if room == 0:
                break
            n = min(room, len(call.items) - call.taken)
            if n == 0:
                continue
            batch.append((call, call.taken, call.taken + n))
            call.taken += n
            room -= n
        if not batch:
            self._busy = False
            return
        items = [item for call, a, b in batch for item in call.items[a:b]]
        self.batch_sizes.append(len(items))
        running = loop.run_in_executor(self._executor, self.fn, items)
        running.add_done_callback(lambda done: self._finish(loop, batch, done))

    def _finish(self, loop: asyncio.AbstractEventLoop, batch: list[tuple[_Call, int, int]], done: Any) -> None:
        error = done.exception()
        results = None if error else list(done.result())
        if results is not None and len(results) != sum(b - a for _, a, b in batch):
            expected = sum(b - a for _, a, b in batch)
            error = RuntimeError(f"the batch function returned {len(results)} results for {expected} items")
        offset = 0
        for call, a, b in batch:
            if error is not None:
                if not call.future.done():
                    call.future.set_exception(error)
                call.taken = len(call.items)  # nothing more of it runs
            elif results is not None:  # always, without an error
                call.results.extend(results[offset : offset + b - a])
                offset += b - a
                if len(call.results) == len(call.items) and not call.future.done():
                    call.future.set_result(call.results)
        self._pending = [c for c in self._pending if c.taken < len(c.items) and not c.future.done()]
        self._start(loop)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
