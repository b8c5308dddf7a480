"""The service's one error body, ``{"detail": [{"loc", "msg", "type"}, ...]}``, and the
exception handlers that produce it for every failure a route can raise."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.engine import EngineFailed, EngineUnavailable, Overloaded, PromptTooLong, TooMuchWork
from service.middleware import refusal
from service.predictor import LimitError
from service.schemas import MAX_REPORTED_ERRORS


class DeadlineExceeded(Exception):
    """The request's deadline passed; its engine work was aborted (504)."""


class ClientGone(Exception):
    """The client disconnected; its engine work was aborted (499, for the logs)."""


def error_response(
    status: int, loc: list[Any], msg: str, kind: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"detail": [{"loc": loc, "msg": msg, "type": kind}]}, headers=headers
    )


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes each offending input back: that can be megabytes, or a lone
    # surrogate that cannot even be encoded as UTF-8. Location, message and type suffice, for
    # the first few errors; the rest are counted.
    errors = exc.errors()
    detail = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in errors[:MAX_REPORTED_ERRORS]
    ]
    if len(errors) > MAX_REPORTED_ERRORS:
        more = len(errors) - MAX_REPORTED_ERRORS
        detail.append(
            {"loc": ["body"], "msg": f"{more} more errors not shown ({len(errors)} in all)", "type": "too_many_errors"}
        )
    return JSONResponse(status_code=422, content={"detail": detail})


async def over_limit(request: Request, exc: LimitError) -> JSONResponse:
    return error_response(422, exc.loc, exc.message, exc.kind)


async def too_long(request: Request, exc: PromptTooLong) -> JSONResponse:
    return error_response(422, ["body"], str(exc), "prompt_too_long")


async def too_much_work(request: Request, exc: TooMuchWork) -> JSONResponse:
    return refusal(422, "too_many_tokens", str(exc))


async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
    return refusal(429, "overload_tokens", str(exc), {"Retry-After": "1"}, ["request"])


async def unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
    # Refused before any work: safe for a balancer to retry elsewhere.
    return error_response(503, ["request"], str(exc), "unavailable", {"Retry-After": "5"})


async def engine_failed(request: Request, exc: EngineFailed) -> JSONResponse:
    return refusal(500, "engine_failed", str(exc), loc=["request"])


async def deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
    return refusal(504, "deadline", str(exc), loc=["request"])


async def client_gone(request: Request, exc: ClientGone) -> JSONResponse:
    # Nobody reads this (the client left); 499 is nginx's code for it, kept for the logs.
    return refusal(499, "client_gone", str(exc), loc=["request"])


HANDLERS: dict[type[Exception], Any] = {
    RequestValidationError: invalid,
    LimitError: over_limit,
    PromptTooLong: too_long,
    TooMuchWork: too_much_work,
    Overloaded: overloaded,
    EngineUnavailable: unavailable,
    EngineFailed: engine_failed,
    DeadlineExceeded: deadline,
    ClientGone: client_gone,
}

#: The error responses of the prediction routes, for the OpenAPI document.
RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong API key (when ERC_API_KEYS is set)."},
    408: {"description": "The body did not arrive within ERC_BODY_TIMEOUT_S."},
    413: {"description": "Body over ERC_MAX_BODY_BYTES (counted as it arrives)."},
    422: {
        "description": "Invalid input: detail[].loc names the field, msg the limit; "
        "also a label set the model does not serve."
    },
    429: {"description": "Over ERC_MAX_INFLIGHT requests or ERC_MAX_INFLIGHT_TOKENS; retry after Retry-After seconds."},
    500: {"description": "The engine failed while serving this request (not safe to replay blindly)."},
    503: {
        "description": "Refused before any work: loading, draining, or the engine is dead (safe to retry elsewhere)."
    },
    504: {"description": "Past the request's deadline; its work was aborted."},
}


def register(app: FastAPI) -> None:
    for exc, handler in HANDLERS.items():
        app.add_exception_handler(exc, handler)
