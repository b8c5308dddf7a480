"""ASGI middleware, outermost first:

0. :class:`Observe`: request id, one log line and the request metrics, for every request.
1. :class:`Gate`: refusals that need no body (draining 503, missing key 401).
2. :class:`BodyReader`: reads the whole body under a size limit (413, counted on the bytes that
   arrive, whatever the transfer encoding) and a deadline (408), then replays it.
3. :class:`Admission`: an in-flight slot (429 beyond ``ERC_MAX_INFLIGHT``), taken only once the
   body is in, so a slow client cannot hold one while it trickles its body.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Protocol

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics
from service.errors import error_response
from service.exceptions import BodyTimeout, BodyTooLarge, Draining, Overload, Unauthorized
from service.security import KeyRing

log = logging.getLogger("service.api")

WORK_PATHS = frozenset({"/predict", "/predict_dialogue"})


class Admitted(Protocol):
    """What the middleware reads and counts on the service state."""

    draining: bool
    inflight: int


def _is_work(scope: Scope) -> bool:
    return scope["type"] == "http" and scope["path"] in WORK_PATHS


class Observe:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = Headers(scope=scope).get("x-request-id", "")
        rid = rid if 0 < len(rid) <= 128 and rid.isprintable() else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        start = time.perf_counter()
        status = 500

        async def tagged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            elapsed = time.perf_counter() - start
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.LATENCY.labels(endpoint, str(status)).observe(elapsed)
            # Never the body: utterance text stays out of logs.
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(1000 * elapsed, 1),
                },
            )
            logs.request_id.reset(token)


class Gate:
    def __init__(self, app: ASGIApp, state: Admitted, keys: KeyRing) -> None:
        self.app, self.state, self.keys = app, state, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_work(scope):
            return await self.app(scope, receive, send)
        if self.state.draining:
            response = error_response(Draining("this replica is shutting down; retry on another"))
        elif not self.keys.authorized(Headers(scope=scope).get("authorization")):
            response = error_response(Unauthorized("missing or wrong API key: send Authorization: Bearer KEY"))
        else:
            return await self.app(scope, receive, send)
        await response(scope, receive, send)


class BodyReader:
    def __init__(self, app: ASGIApp, limit: int, timeout_s: float) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    def _too_large(self, size: str) -> JSONResponse:
        return error_response(
            BodyTooLarge(f"body of {size} bytes exceeds the limit of {self.limit} (ERC_MAX_BODY_BYTES)")
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            # Declared too large (or nonsense): refuse before reading a byte.
            return await self._too_large(length if length.isdigit() else "unknown")(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                response = error_response(
                    BodyTimeout(f"the body did not arrive within {self.timeout_s:g} s (ERC_BODY_TIMEOUT_S)")
                )
                return await response(scope, receive, send)
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                # Counted on what arrived: a chunked body (any header case) or a body longer
                # than its Content-Length is stopped here, not parsed.
                return await self._too_large(f"more than {self.limit}")(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # only a disconnect is left to hear

        await self.app(scope, replay, send)


class Admission:
    def __init__(self, app: ASGIApp, state: Admitted, limit: int) -> None:
        self.app, self.state, self.limit = app, state, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _is_work(scope):
            return await self.app(scope, receive, send)
        if self.state.inflight >= self.limit:
            message = (
                f"{self.state.inflight} requests in flight, the limit is {self.limit} (ERC_MAX_INFLIGHT); retry shortly"
            )
            return await error_response(Overload(message))(scope, receive, send)
        self.state.inflight += 1
        metrics.INFLIGHT.set(self.state.inflight)
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1
            metrics.INFLIGHT.set(self.state.inflight)


def install(app: Any, state: Admitted, keys: KeyRing, settings: Any) -> None:
    """Add them in their order (Starlette runs the last added outermost)."""
    app.add_middleware(Admission, state=state, limit=settings.max_inflight)
    app.add_middleware(BodyReader, limit=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(Gate, state=state, keys=keys)
    app.add_middleware(Observe)
