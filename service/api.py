"""Server wiring: ``create_app`` registers the middleware, the error handlers and the routers,
and a lifespan that loads model, indexes and engine in the background. The serving logic lives
in :mod:`service.predictor`, the routes in :mod:`service.routes`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import errors, middleware
from service.routes import playground, predict, probes
from service.security import KeyRing
from service.settings import Settings, get_settings
from service.startup import StartupError, explain
from service.state import Loader, ServiceState

log = logging.getLogger("service.api")


async def load_service(settings: Settings, state: ServiceState) -> None:
    """Load spec, encoder + indexes, and the engine; publish the predictor when all are up."""
    from service.engine import Engine
    from service.predictor import assemble
    from service.served_model import served_model_dir

    model_dir = served_model_dir(settings)
    if not (model_dir / "config.json").is_file():
        raise StartupError(
            f"the model folder {model_dir} holds no checkpoint",
            "build it with `erc weights build` (or `make weights`), or point ERC_MODEL / ERC_MODEL_DIR at a built one",
            permanent=True,
        )
    engine = Engine(settings, model_dir)
    state.engine = engine
    # The encoder and the indexes load in a thread while the engine starts in its own processes
    # (each takes seconds; on two cores they overlap), but only once those processes exist: the
    # torch encoder sets torch's thread pool, which a forked engine must not inherit.
    processes = asyncio.Event()
    starting = asyncio.create_task(engine.start(processes))
    await asyncio.wait([starting, asyncio.create_task(processes.wait())], return_when=asyncio.FIRST_COMPLETED)
    assembling = asyncio.create_task(asyncio.to_thread(assemble, settings, model_dir, engine))
    try:
        await starting
    finally:
        predictor = await assembling
    for name, why in predictor.unavailable.items():
        log.warning("label set %s not served: %s", name, why)
    if not predictor.served:
        await engine.shutdown()
        raise StartupError(
            f"no label set of {model_dir} can be served (" + "; ".join(predictor.unavailable.values()) + ")",
            "build the demonstration indexes with `erc index ensure` (or mount them at ERC_INDEX_ROOT)",
            permanent=True,
        )
    await predictor.warm_up()
    state.predictor = predictor
    log.info(
        "ready: model %s from %s, serving label sets %s",
        predictor.spec.model_name,
        model_dir,
        ", ".join(predictor.served),
    )


def _lifespan(settings: Settings, state: ServiceState, loader: Loader):
    async def load() -> None:
        try:
            await loader(settings, state)
        except Exception as exc:
            # Reported by /health and /ready; `erc serve` then exits with the failure's status
            # (service.server), so that Docker, a restart policy or Kubernetes acts on it.
            failure = explain(exc)
            state.error = f"{type(exc).__name__}: {exc}"
            log.error("loading the service failed", exc_info=exc)
            log.critical(failure.message())
            state.fail(failure)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health answers while the model loads.
        state.tasks.append(asyncio.create_task(load()))
        yield
        for task in state.tasks:
            task.cancel()
        if state.engine is not None:
            await state.engine.shutdown()

    return lifespan


def create_app(settings: Settings | None = None, loader: Loader = load_service) -> FastAPI:
    """Build the app. ``loader`` fills the state in the background (tests pass a double).
    Raises :class:`service.security.KeyConfigError` when API keys are set but unusable."""
    settings = settings or get_settings()
    state = ServiceState()
    keys = KeyRing(settings)
    app = FastAPI(
        title="InstructERC service",
        summary="Emotion recognition in conversation by a LoRA-fine-tuned LLM (InstructERC).",
        version="0.1.0",
        lifespan=_lifespan(settings, state, loader),
    )
    app.state.service, app.state.settings, app.state.keys = state, settings, keys
    middleware.install(app, state, keys, settings)
    errors.register(app)
    app.include_router(predict.router)
    app.include_router(probes.router)
    app.include_router(playground.router)
    return app
