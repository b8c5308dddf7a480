"""``POST /predict`` and ``POST /predict_dialogue``: validate, translate the protocol
(:mod:`service.schemas`) into the predictor's types and its answer back, under the request's
deadline."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request

from service.data import Dialogue, Turn
from service.errors import RESPONSES
from service.exceptions import ClientGone, DeadlineExceeded, HeaderError, Unavailable
from service.predictor import Predictor
from service.schemas import (
    DemonstrationOut,
    DialogueIn,
    DialogueResult,
    Prediction,
    PredictDialogueRequest,
    PredictDialogueResponse,
    PredictRequest,
    PredictResponse,
)
from service.settings import Settings
from service.state import ServiceState

router = APIRouter()

T = TypeVar("T")


def ready_predictor(request: Request) -> Predictor:
    """Dependency: the predictor, or 503 while loading or once the engine has died."""
    state: ServiceState = request.app.state.service
    if state.dead:
        raise Unavailable("the engine has died; the process must be restarted")
    if state.predictor is None:
        raise Unavailable(
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
        raise HeaderError("must be a positive number of seconds", "x-request-timeout")
    return min(timeout, value)


async def bounded(request: Request, work: Callable[[], Awaitable[T]]) -> T:
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


def _dialogue(d: DialogueIn) -> Dialogue:
    return Dialogue(d.id or "", tuple(Turn(t.speaker, t.text) for t in d.turns))


@router.post("/predict", response_model=PredictResponse, response_model_exclude_none=True, responses=RESPONSES)
async def predict(request: Request, body: PredictRequest, p: Ready) -> PredictResponse:
    """Label one utterance (default: the dialogue's last turn) with its probabilities."""
    answer = await bounded(request, lambda: p.predict(_dialogue(body.dialogue), body.target, body.label_set))
    scored = answer.scored
    return PredictResponse(
        label=scored.prediction.label,
        scores=scored.prediction.scores,
        id=body.dialogue.id,
        target=answer.target,
        label_set=answer.label_set,
        model=answer.model,
        prompt=scored.prompt if body.debug else None,
        demonstrations=[
            DemonstrationOut(text=d.text, label=d.label, dialogue_id=d.dialogue_id, score=d.score)
            for d in scored.demonstrations
        ]
        if body.debug
        else None,
    )


@router.post("/predict_dialogue", response_model=PredictDialogueResponse, responses=RESPONSES)
async def predict_dialogue(request: Request, body: PredictDialogueRequest, p: Ready) -> PredictDialogueResponse:
    """Label every utterance of every dialogue, in input order, in one engine batch."""
    dialogues = [_dialogue(d) for d in body.dialogues]
    answer = await bounded(request, lambda: p.predict_dialogues(dialogues, body.label_set))
    return PredictDialogueResponse(
        results=[
            DialogueResult(id=d.id, predictions=[Prediction(label=q.label, scores=q.scores) for q in predictions])
            for d, predictions in zip(body.dialogues, answer.predictions)
        ],
        label_set=answer.label_set,
        model=answer.model,
    )
