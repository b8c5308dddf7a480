"""Server wiring: the FastAPI app, its lifespan (engine, encoder and index loading), routes,
error mapping and metrics. The serving logic lives in :mod:`service.predictor`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import logs, metrics, middleware
from service.middleware import refusal
from service.engine import EngineUnavailable, PromptTooLong
from service.predictor import LimitError, Predictor
from service.security import KeyRing
from service.schemas import (
    MAX_REPORTED_ERRORS,
    HealthResponse,
    PredictDialogueRequest,
    PredictDialogueResponse,
    PredictRequest,
    PredictResponse,
)
from service.settings import Settings, get_settings

log = logging.getLogger("service.api")


@dataclass
class ServiceState:
    """What the lifespan has loaded so far."""

    predictor: Predictor | None = None
    engine: Any = None
    error: str | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    #: Set on SIGTERM: new work gets 503 so the balancer retries it on another replica.
    draining: bool = False
    #: Prediction requests being served now.
    inflight: int = 0

    @property
    def ready(self) -> bool:
        return self.predictor is not None and not self.dead and not self.draining

    @property
    def dead(self) -> bool:
        return bool(self.engine is not None and getattr(self.engine, "dead", False))


class DeadlineExceeded(Exception):
    pass


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def ready_predictor(request: Request) -> Predictor:
    """Dependency: the predictor, or 503 while loading or once the engine has died."""
    state: ServiceState = request.app.state.service
    if state.dead:
        raise EngineUnavailable("the engine has died; the process must be restarted")
    if state.predictor is None:
        raise EngineUnavailable(state.error or "the service is still loading; retry shortly")
    return state.predictor


Ready = Annotated[Predictor, Depends(ready_predictor)]

Loader = Callable[[Settings, ServiceState], Awaitable[None]]


async def load_service(settings: Settings, state: ServiceState) -> None:
    """Load model spec, encoder + index, and the engine; publish the predictor when all are up."""
    from service.data import Dialogue, Turn
    from service.engine import Engine
    from service.labels import LABEL_SETS
    from service.predictor import open_indexes
    from service.spec import ServingSpec
    from service.templates import erc_prompt
    from service.weights import default_model_dir

    model_dir = settings.model_dir or default_model_dir(settings.weights_root)
    spec = ServingSpec.load(model_dir)
    indexes = await asyncio.to_thread(open_indexes, settings, spec)
    engine = Engine(settings, model_dir)
    predictor = Predictor(settings, spec, engine, indexes)
    for name, why in predictor.unavailable.items():
        log.warning("label set %s not served: %s", name, why)
    if not predictor.served:
        raise RuntimeError(f"no label set can be served by {model_dir}: " + "; ".join(f"{k}: {v}" for k, v in predictor.unavailable.items() if k in spec.label_sets))
    state.engine = engine
    await engine.start()
    default = predictor.served[0]
    labels = LABEL_SETS[default]
    await engine.warm_up(erc_prompt(Dialogue("warm-up", (Turn("a", "Hello!"),)), 0, labels, spec.label_sets[default].window), labels)
    state.predictor = predictor
    log.info("ready: model %s from %s, serving label sets %s", spec.model_name, model_dir, ", ".join(predictor.served))


def create_app(settings: Settings | None = None, loader: Loader = load_service) -> FastAPI:
    """Build the app. ``loader`` fills the state in the background (tests pass a double)."""
    settings = settings or get_settings()
    state = ServiceState()

    async def load() -> None:
        try:
            await loader(settings, state)
        except Exception as exc:  # reported by /health and /ready; the process stays up
            state.error = f"{type(exc).__name__}: {exc}"
            log.exception("loading the service failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health answers while the model loads.
        state.tasks.append(asyncio.create_task(load()))
        yield
        for task in state.tasks:
            task.cancel()
        if state.engine is not None and hasattr(state.engine, "shutdown"):
            await state.engine.shutdown()

    app = FastAPI(
        title="InstructERC service",
        summary="Emotion recognition in conversation by a LoRA-fine-tuned LLM (InstructERC).",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.service = state

    # Raises KeyConfigError (the process does not start) when keys are set but unusable.
    keys = KeyRing(settings)
    app.state.keys = keys
    middleware.install(app, state, keys, settings)

    def refuse(status: int, reason: str, detail: str) -> JSONResponse:
        return refusal(status, reason, detail, loc=["request"])

    @app.middleware("http")
    async def observe(request: Request, call_next):
        rid = request.headers.get("x-request-id", "")
        rid = rid if 0 < len(rid) <= 128 and rid.isprintable() else uuid.uuid4().hex
        token = logs.request_id.set(rid)
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-ID"] = rid
            return response
        finally:
            elapsed = time.perf_counter() - start
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.LATENCY.labels(endpoint, str(status)).observe(elapsed)
            # Never the body: utterance text stays out of logs (ERC_LOG_TEXT governs the rest).
            log.info("request", extra={"method": request.method, "path": request.url.path, "status": status, "duration_ms": round(1000 * elapsed, 1)})
            logs.request_id.reset(token)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each offending input back: that can be megabytes, or a lone
        # surrogate that cannot even be encoded as UTF-8. Location, message and type suffice,
        # for the first few errors; the rest are counted.
        errors = exc.errors()
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))} for e in errors[:MAX_REPORTED_ERRORS]]
        if len(errors) > MAX_REPORTED_ERRORS:
            more = len(errors) - MAX_REPORTED_ERRORS
            detail.append({"loc": ["body"], "msg": f"{more} more errors not shown ({len(errors)} in all)", "type": "too_many_errors"})
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(LimitError)
    async def limit_error(request: Request, exc: LimitError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [{"loc": exc.loc, "msg": exc.message, "type": exc.kind}]})

    @app.exception_handler(PromptTooLong)
    async def too_long(request: Request, exc: PromptTooLong) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body"], "msg": str(exc), "type": "prompt_too_long"}]})

    @app.exception_handler(EngineUnavailable)
    async def unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": [{"loc": ["request"], "msg": str(exc), "type": "unavailable"}]}, headers={"Retry-After": "5"})

    @app.exception_handler(DeadlineExceeded)
    async def deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        return refuse(504, "deadline", str(exc))

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        # Nobody reads this (the client left); 499 is nginx's code for it, kept for the logs.
        return refuse(499, "client_gone", str(exc))

    async def bounded(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``work`` under the request's deadline; abort it (and its engine requests) when
        the deadline passes or the client disconnects."""
        timeout = settings.request_timeout_s
        asked = request.headers.get("x-request-timeout")
        if asked is not None:
            try:
                value = float(asked)
            except ValueError:
                value = math.nan
            if not (value > 0 and math.isfinite(value)):
                raise LimitError(["header", "x-request-timeout"], f"must be a positive number of seconds, got {asked!r}", top="header")
            timeout = min(timeout, value)
        task = asyncio.ensure_future(work())
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watch}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if watch in done:
            raise ClientGone("the client disconnected; its work was aborted")
        raise DeadlineExceeded(f"the request did not finish within its deadline of {timeout:g} s (ERC_REQUEST_TIMEOUT_S or X-Request-Timeout); its work was aborted")

    errors: dict[int | str, dict[str, Any]] = {
        401: {"description": "Missing or wrong API key (when ERC_API_KEYS is set)."},
        411: {"description": "Chunked body without Content-Length."},
        413: {"description": "Body over ERC_MAX_BODY_BYTES."},
        422: {"description": "Invalid input: detail[].loc names the field, msg the limit."},
        429: {"description": "Over ERC_MAX_INFLIGHT; retry after Retry-After seconds."},
        503: {"description": "Loading, draining, or the engine died."},
        504: {"description": "Past the request's deadline; its work was aborted."},
    }

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=errors)
    async def predict(request: Request, body: PredictRequest, p: Ready) -> PredictResponse:
        """Label one utterance (default: the dialogue's last turn) with its probabilities."""
        return await bounded(request, lambda: p.predict(body))

    @app.post("/predict_dialogue", response_model=PredictDialogueResponse, responses=errors)
    async def predict_dialogue(request: Request, body: PredictDialogueRequest, p: Ready) -> PredictDialogueResponse:
        """Label every utterance of every dialogue, in input order, in one engine batch."""
        return await bounded(request, lambda: p.predict_dialogue(body))

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> Any:
        """Liveness: 503 once the engine has died or loading failed (restart the process)."""
        if state.dead:
            return JSONResponse(status_code=503, content={"status": "dead", "detail": "the engine has died"})
        if state.error:
            return JSONResponse(status_code=503, content={"status": "failed", "detail": state.error})
        return HealthResponse(status="ok")

    @app.get("/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def ready() -> Any:
        """Readiness: 200 once engine, encoder and indexes are loaded; lists the label sets served."""
        if state.ready:
            assert state.predictor is not None
            return HealthResponse(status="ready", label_sets=state.predictor.served)
        status = "draining" if state.draining else "dead" if state.dead else "failed" if state.error else "loading"
        return JSONResponse(status_code=503, content={"status": status, "detail": state.error})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
