"""What the service sets up inside vLLM's engine processes (the engine core and its CPU worker).

**Lifetime.** The server owns the engine's lifetime. A SIGTERM or SIGINT sent to the whole
process group or control group (systemd's default ``KillMode=control-group``, ``tini -g``,
``kill -- -PGID``, Ctrl-C in a terminal) reaches the engine's processes as well as the server;
vLLM's own handlers would stop the engine at once and fail the requests the server is draining.
:func:`guard` makes those processes ignore such signals once the engine has started
(:func:`mark_started`) while the server lives and has not begun to stop the engine itself
(:func:`request_stop`, called by :meth:`service.engine.Engine.shutdown` before vLLM terminates its
processes). Until the engine has started, every signal is honoured: no request can be in flight
yet, and a start that fails (a KV cache larger than free memory, say) is torn down by vLLM with
SIGTERM, which must reach its processes for the server to exit with its failure status. When the
server is gone, the engine's processes stop on their own: a watchdog thread sees it and lets the
signal through.

**Shared memory.** vLLM passes each step between engine core and worker through two ring buffers
in ``/dev/shm`` of ten chunks each (16 and 24 MiB chunks by default: 400 MiB, refused up front
by a container's default 64 MiB /dev/shm). Messages larger than a chunk go over vLLM's socket
path instead, so smaller chunks stay correct; :func:`fit_message_queues` shrinks the chunks to
fit half the free space when /dev/shm is too small for the defaults, and leaves them alone
otherwise.

:func:`register` is the vLLM general plugin (entry point ``vllm.general_plugins``) that applies
both in every process vLLM starts; a forked process inherits the server's patched classes and
gets :func:`guard` from the fork hook in :mod:`service.engine`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

#: A file the server creates when it stops the engine on purpose (a signal is then honoured).
STOP_FILE_ENV = "ERC_ENGINE_STOP_FILE"
#: The pid of the server that owns the engine.
SERVER_PID_ENV = "ERC_ENGINE_SERVER_PID"
SHM_PATH = "/dev/shm"
#: vLLM's two message queues, of this many chunks each (MessageQueue's default).
QUEUES, CHUNKS = 2, 10
#: The smallest chunk worth having; below it every step's message would take the socket path.
MIN_CHUNK_BYTES = 1 << 20
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PATCHED = "_erc_fitted"


# --- the server's side ----------------------------------------------------------------------
def own_lifetime() -> Path:
    """In the server, before the engine's processes start: name this process as their owner and
    make the stop file's path known to them (through the environment, which forked and spawned
    processes both inherit). Returns the stop file's path."""
    stop = Path(tempfile.mkdtemp(prefix="erc-engine-")) / "stop"
    os.environ[STOP_FILE_ENV] = str(stop)
    os.environ[SERVER_PID_ENV] = str(os.getpid())
    return stop


def started_mark(stop: Path) -> Path:
    """The file that says the engine has started (next to the stop file)."""
    return stop.with_name("started")


def mark_started(stop: Path) -> None:
    """In the server, once the engine has started: from now on its processes ignore group-wide
    SIGTERM and SIGINT (until :func:`request_stop`)."""
    started_mark(stop).touch()


def request_stop(stop: Path) -> None:
    """In the server, just before it terminates the engine's processes: from now on they honour
    SIGTERM and SIGINT."""
    stop.touch()


def release(stop: Path) -> None:
    """Remove the stop file's folder once the engine has stopped."""
    shutil.rmtree(stop.parent, ignore_errors=True)


# --- the engine processes' side -------------------------------------------------------------
class _Guard:
    """Per-process state of :func:`guard` (reset in each new process)."""

    pid = 0
    stop: Path | None = None
    server = 0
    parent = 0


def _server_gone() -> bool:
    """The server (or the process that started this one) has died."""
    if os.getppid() != _Guard.parent:
        return True
    try:
        os.kill(_Guard.server, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def honoured() -> bool:
    """Whether a SIGTERM or SIGINT arriving now should stop this engine process: yes unless the
    engine has started, is not being stopped, and its server lives."""
    stop = _Guard.stop
    return stop is None or not started_mark(stop).exists() or stop.exists() or _server_gone()


def _guarded(handler: Any) -> Any:
    if not callable(handler) or getattr(handler, "_erc_guarded", False):
        return handler

    def on_signal(signum: int, frame: Any) -> Any:
        if honoured():
            return handler(signum, frame)
        log.warning(
            "engine process %d: %s ignored; the server drains its requests, then stops the engine",
            os.getpid(),
            signal.Signals(signum).name,
        )
        return None

    on_signal._erc_guarded = True  # type: ignore[attr-defined]
    return on_signal


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _watch(poll_s: float = 0.5, grace_s: float = 30.0) -> None:
    """Stop this process once the server is gone: vLLM's own handler first, then a hard exit."""
    while not _server_gone():
        time.sleep(poll_s)
    log.warning("engine process %d: the server is gone; stopping", os.getpid())
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace_s)
    os._exit(1)


def guard(forked: bool = False) -> None:
    """In an engine process (forked or spawned by the server named in the environment): ignore
    group-wide SIGTERM and SIGINT while the started engine serves, and stop when the server dies. A no-op in the
    server itself and in processes not started for an engine. Idempotent per process.
    ``forked``: called right after a fork, where the handlers in place are the server's."""
    stop, server = os.environ.get(STOP_FILE_ENV), os.environ.get(SERVER_PID_ENV)
    if not stop or not server or not server.isdigit() or int(server) == os.getpid() or _Guard.pid == os.getpid():
        return
    _Guard.pid, _Guard.stop, _Guard.server, _Guard.parent = os.getpid(), Path(stop), int(server), os.getppid()
    if not getattr(signal.signal, "_erc_guarded", False):
        install: Callable[..., Any] = signal.signal

        def guarded_signal(signalnum: int, handler: Any) -> Any:
            if signalnum in _SIGNALS:
                handler = _guarded(handler)
            return install(signalnum, handler)

        guarded_signal._erc_guarded = True  # type: ignore[attr-defined]
        signal.signal = guarded_signal  # type: ignore[assignment]
    # A spawned process has vLLM's handlers in place already: they are wrapped. A forked one
    # still carries the server's, which must not run here: until vLLM installs its own, a
    # signal that is honoured just exits.
    for signum in _SIGNALS:
        current = signal.getsignal(signum)
        signal.signal(signum, _exit if forked or not callable(current) else current)
    threading.Thread(target=_watch, name="erc-server-watch", daemon=True).start()


# --- shared memory --------------------------------------------------------------------------
def chunk_limit(free_bytes: int) -> int:
    """The largest message-queue chunk that lets both queues fit in half of ``free_bytes`` of
    /dev/shm (never below :data:`MIN_CHUNK_BYTES`), rounded down to whole MiB."""
    share = free_bytes // 2 // (QUEUES * CHUNKS)
    return max(MIN_CHUNK_BYTES, share // MIN_CHUNK_BYTES * MIN_CHUNK_BYTES)


def shm_free_bytes() -> int | None:
    try:
        return shutil.disk_usage(SHM_PATH).free
    except OSError:
        return None


#: This process's chunk limit, fixed when its first ring buffer is made (the free space then
#: shrinks as the buffers fill, and both buffers must get the same limit).
_LIMIT: dict[int, int | None] = {}


def _process_chunk_limit() -> int | None:
    pid = os.getpid()
    if pid not in _LIMIT:
        free = shm_free_bytes()
        _LIMIT[pid] = chunk_limit(free) if free is not None else None
    return _LIMIT[pid]


def fit_message_queues() -> None:
    """Clamp the chunks of the ring buffers this process creates to :func:`chunk_limit` of the
    free /dev/shm (buffers opened from another process keep the creator's size). Idempotent."""
    from vllm.distributed.device_communicators import shm_broadcast

    ring = shm_broadcast.ShmRingBuffer
    if getattr(ring, _PATCHED, False):
        return
    create = ring.__init__

    def __init__(self: Any, n_reader: int, max_chunk_bytes: int, max_chunks: int, name: str | None = None) -> None:
        if name is None:
            limit = _process_chunk_limit()
            if limit is not None and max_chunk_bytes > limit:
                log.info(
                    "/dev/shm has %d MiB free: vLLM's message queue chunks shrink from %d to %d MiB",
                    (shm_free_bytes() or 0) >> 20,
                    max_chunk_bytes >> 20,
                    limit >> 20,
                )
                max_chunk_bytes = limit
        create(self, n_reader, max_chunk_bytes, max_chunks, name)

    ring.__init__ = __init__
    setattr(ring, _PATCHED, True)


def shm_shortfall() -> str | None:
    """Why the engine cannot start in this /dev/shm (too small even for the smallest chunks), or
    None when it can."""
    free = shm_free_bytes()
    need = QUEUES * CHUNKS * MIN_CHUNK_BYTES
    if free is None or free >= need:
        return None
    return f"{SHM_PATH} has {free >> 20} MiB free; the engine's message queues need at least {need >> 20} MiB"


def register() -> None:
    """vLLM general plugin: guard engine processes; on CPU, fit the message queues."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        fit_message_queues()
    guard()
