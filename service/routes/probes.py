"""``GET /health`` (liveness), ``GET /ready`` (readiness) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.schemas import HealthResponse
from service.state import ServiceState

router = APIRouter()

#: The cause of a failed load (exception text, paths) goes to the log, not to whoever probes.
LOAD_FAILED = "loading failed; the service log says why"


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> Any:
    """Liveness: 503 once the engine has died or hung, or loading failed (restart the process)."""
    state: ServiceState = request.app.state.service
    if state.dead:
        return JSONResponse(status_code=503, content={"status": "dead", "detail": "the engine has died"})
    if state.stalled:
        stall = request.app.state.settings.engine_stall_s
        return JSONResponse(
            status_code=503,
            content={
                "status": "stalled",
                "detail": f"work is pending and the engine has not stepped for over {stall:g} s (ERC_ENGINE_STALL_S)",
            },
        )
    if state.error:
        return JSONResponse(status_code=503, content={"status": "failed", "detail": LOAD_FAILED})
    return HealthResponse(status="ok")


@router.get("/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def ready(request: Request) -> Any:
    """Readiness: 200 once engine, encoder and indexes are loaded; lists the label sets served."""
    state: ServiceState = request.app.state.service
    if state.ready and state.predictor is not None:
        return HealthResponse(status="ready", label_sets=state.predictor.served)
    status = "draining" if state.draining else "dead" if state.dead else "failed" if state.error else "loading"
    return JSONResponse(status_code=503, content={"status": status, "detail": LOAD_FAILED if state.error else None})


@router.get("/metrics", include_in_schema=False)
async def prometheus() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
