"""Server wiring: the FastAPI app, its lifespan (engine, encoder and index loading), routes,
error mapping and metrics. The serving logic lives in :mod:`service.predictor`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.engine import EngineUnavailable, PromptTooLong
from service.predictor import LimitError, Predictor
from service.schemas import (
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


WORK_PATHS = frozenset({"/predict", "/predict_dialogue"})


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
    from service.retrieval import DemonstrationIndex, Encoder
    from service.spec import ServingSpec
    from service.templates import erc_prompt
    from service.weights import default_model_dir

    model_dir = settings.model_dir or default_model_dir(settings.weights_root)
    spec = ServingSpec.load(model_dir)
    index = None
    if spec.demonstrations.k > 0:
        folder = settings.index_root / spec.demonstrations.index

        def load_index() -> DemonstrationIndex:
            return DemonstrationIndex(folder, Encoder(settings.encoder_dir, settings.encoder_batch_size))

        index = await asyncio.to_thread(load_index)
    engine = Engine(settings, model_dir)
    state.engine = engine
    await engine.start()
    labels = LABEL_SETS[spec.label_set]
    await engine.warm_up(erc_prompt(Dialogue("warm-up", (Turn("a", "Hello!"),)), 0, labels, spec.window), labels)
    state.predictor = Predictor(settings, spec, engine, index)
    log.info("ready: model %s from %s, label set %s", spec.model_name, model_dir, spec.label_set)


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

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        status = 500
        work = request.url.path in WORK_PATHS
        try:
            if work and state.draining:
                status = 503
                return JSONResponse(
                    status_code=503,
                    content={"detail": "this replica is shutting down; retry on another"},
                    headers={"Retry-After": "1", "Connection": "close"},
                )
            if work:
                state.inflight += 1
            try:
                response = await call_next(request)
            finally:
                if work:
                    state.inflight -= 1
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.LATENCY.labels(endpoint, str(status)).observe(time.perf_counter() - start)

    @app.exception_handler(LimitError)
    async def limit_error(request: Request, exc: LimitError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [{"loc": exc.loc, "msg": exc.message, "type": "limit_exceeded"}]})

    @app.exception_handler(PromptTooLong)
    async def too_long(request: Request, exc: PromptTooLong) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": [{"loc": ["body"], "msg": str(exc), "type": "prompt_too_long"}]})

    @app.exception_handler(EngineUnavailable)
    async def unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": str(exc)}, headers={"Retry-After": "5"})

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=True)
    async def predict(body: PredictRequest, p: Ready) -> PredictResponse:
        """Label one utterance (default: the dialogue's last turn) with its probabilities."""
        return await p.predict(body)

    @app.post("/predict_dialogue", response_model=PredictDialogueResponse)
    async def predict_dialogue(body: PredictDialogueRequest, p: Ready) -> PredictDialogueResponse:
        """Label every utterance of every dialogue, in input order, in one engine batch."""
        return await p.predict_dialogue(body)

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
        """Readiness: 200 once engine, encoder and index are loaded."""
        if state.ready:
            return HealthResponse(status="ready")
        status = "draining" if state.draining else "dead" if state.dead else "failed" if state.error else "loading"
        return JSONResponse(status_code=503, content={"status": status, "detail": state.error})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
