"""Why a start failed, said so that an operator can act on it.

A server whose model, indexes or engine cannot load logs one line naming the cause and the fix
and exits with a non-zero status (Docker shows it, restart policies and Kubernetes act on it),
instead of idling unready. :class:`StartupError` carries what the service knows about a failure
it detected itself; :func:`explain` turns any exception raised while loading into one.
"""

from __future__ import annotations

from service.served_model import WeightsError

#: Exit statuses (sysexits.h): a restart cannot fix a configuration error; it may fix the rest.
EXIT_CONFIG = 78
EXIT_FAILED = 70

SHM_FIX = (
    "give the container more shared memory: `docker run --shm-size 1g`, compose `shm_size: 1g`, "
    "or in Kubernetes an emptyDir with `medium: Memory` mounted at /dev/shm"
)


class StartupError(RuntimeError):
    """A start that cannot succeed: ``cause`` (what is wrong), ``fix`` (what to do) and
    ``permanent`` (whether restarting the same configuration can help)."""

    def __init__(self, cause: str, fix: str, *, permanent: bool) -> None:
        super().__init__(cause)
        self.cause, self.fix, self.permanent = cause, fix, permanent

    @property
    def exit_code(self) -> int:
        return EXIT_CONFIG if self.permanent else EXIT_FAILED

    def message(self) -> str:
        restart = "a restart will not fix this" if self.permanent else "a restart may fix this"
        return f"the service cannot start: {self.cause}. Fix: {self.fix} ({restart})"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def explain(exc: BaseException) -> StartupError:
    """The :class:`StartupError` for an exception raised while the service loaded."""
    chain = _chain(exc)
    for error in chain:
        if isinstance(error, StartupError):
            return error
    text = " | ".join(f"{type(e).__name__}: {e}" for e in chain)
    if any(isinstance(e, WeightsError) for e in chain):
        return StartupError(text, "name a committed adapter (ERC_MODEL) or a built model folder", permanent=True)
    if "/dev/shm" in text:
        return StartupError(text, SHM_FIX, permanent=True)
    if any(isinstance(e, MemoryError) for e in chain) or "out of memory" in text.lower():
        return StartupError(text, "give the process more memory or lower ERC_KV_CACHE_GIB", permanent=False)
    return StartupError(
        text,
        "read the lines above (the engine's own processes log their cause there); "
        "check the settings, the weights and the indexes",
        permanent=False,
    )
