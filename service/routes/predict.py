"""``POST /predict`` and ``POST /predict_dialogue``: validate, then hand over to the predictor
under the request's deadline."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from service.engine import EngineUnavailable
from service.errors import RESPONSES, ClientGone, DeadlineExceeded
from service.predictor import LimitError, Predictor
from service.schemas import PredictDialogueRequest, PredictDialogueResponse, PredictRequest, PredictResponse
from service.settings import Settings
from service.state import ServiceState

router = APIRouter()


def ready_predictor(request: Request) -> Predictor:
    """Dependency: the predictor, or 503 while loading or once the engine has died."""
    state: ServiceState = request.app.state.service
    if state.dead:
        raise EngineUnavailable("the engine has died; the process must be restarted")
    if state.predictor is None:
        raise EngineUnavailable(
            "loading failed; the service log says why" if state.error else "the service is still loading; retry shortly"
        )
    return state.predictor


Ready = Annotated[Predictor, Depends(ready_predictor)]


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so only a disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _deadline(request: Request, settings: Settings) -> float:
    timeout = settings.request_timeout_s
    asked = request.headers.get("x-request-timeout")
    if asked is None:
        return timeout
    try:
        value = float(asked)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise LimitError(["header", "x-request-timeout"], "must be a positive number of seconds", top="header")
    return min(timeout, value)


async def bounded(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``work`` under the request's deadline; abort it (and its engine requests) when the
    deadline passes or the client disconnects."""
    timeout = _deadline(request, request.app.state.settings)
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
    raise DeadlineExceeded(
        f"the request did not finish within its deadline of {timeout:g} s "
        "(ERC_REQUEST_TIMEOUT_S or X-Request-Timeout); its work was aborted"
    )


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=RESPONSES)
async def predict(request: Request, body: PredictRequest, p: Ready) -> PredictResponse:
    """Label one utterance (default: the dialogue's last turn) with its probabilities."""
    return await bounded(request, lambda: p.predict(body))


@router.post("/predict_dialogue", response_model=PredictDialogueResponse, responses=RESPONSES)
async def predict_dialogue(request: Request, body: PredictDialogueRequest, p: Ready) -> PredictDialogueResponse:
    """Label every utterance of every dialogue, in input order, in one engine batch."""
    return await bounded(request, lambda: p.predict_dialogue(body))
