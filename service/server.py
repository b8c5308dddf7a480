"""Running the app under uvicorn with a graceful drain on SIGTERM.

On SIGTERM or SIGINT the replica reports not ready and answers new work with 503 (so a balancer
with ``proxy_next_upstream http_503`` retries it elsewhere) for at least ``ERC_DRAIN_GRACE_S``,
waits for in-flight requests to finish (at most ``ERC_DRAIN_TIMEOUT_S``), then shuts down and
stops the engine. The same holds when the signal goes to the whole process group: the engine's
processes leave their lifetime to the server (:mod:`service.engine_process`). A second signal
stops at once the uvicorn way.

A start that fails (model, indexes or engine cannot load) exits with a non-zero status after
logging the cause and the fix (:mod:`service.startup`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn

from service import start_method
from service.api import create_app
from service.state import ServiceState
from service.settings import Settings

# uvicorn configures this logger: drain messages land beside its own.
log = logging.getLogger("uvicorn.error")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServiceState, settings: Settings) -> None:
        super().__init__(config)
        self.state = state
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if sig in (signal.SIGTERM, signal.SIGINT) and not self.state.draining and loop is not None:
            self.state.draining = True
            log.info("%s: draining (%d requests in flight)", signal.Signals(sig).name, self.state.inflight)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))
            return
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        start = time.monotonic()
        await asyncio.sleep(self.settings.drain_grace_s)
        while self.state.inflight and time.monotonic() - start < self.settings.drain_timeout_s:
            await asyncio.sleep(0.05)
        log.info("drained in %.1f s (%d left in flight); shutting down", time.monotonic() - start, self.state.inflight)
        self.should_exit = True


def serve(settings: Settings, host: str, port: int) -> None:
    from service import logs

    logs.configure(json_logs=settings.log_json)
    # This process has run nothing on torch: the engine's processes can be forked from it.
    settings = settings.model_copy(
        update={"engine_start": start_method.resolve(settings.engine_start, fresh_process=True)}
    )
    app = create_app(settings)
    # log_config=None: keep our handlers; access_log off: our middleware logs each request
    # with its id, status and duration.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
    )
    state = app.state.service
    server = DrainingServer(config, state, settings)
    state.on_failure.append(lambda failure: setattr(server, "should_exit", True))
    server.run()
    if state.failure is not None:
        raise SystemExit(state.failure.exit_code)
