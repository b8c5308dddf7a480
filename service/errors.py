"""The service's one error body, ``{"detail": [{"loc", "msg", "type"}, ...]}``: built by
:func:`error_response` for every error, whether a middleware refuses a request or a route raises,
and counted there in ``erc_rejected_requests_total`` by its type.

The errors themselves are :mod:`service.exceptions`; the engine raises its own exceptions, which
:data:`ENGINE_ERRORS` names in that vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

from service import engine, exceptions, metrics
from service.exceptions import InvalidRequest, ServiceError

#: The engine's exceptions, as the client is told about them.
ENGINE_ERRORS: dict[type[Exception], type[ServiceError]] = {
    engine.PromptTooLong: exceptions.PromptTooLong,
    engine.TooMuchWork: exceptions.TooManyTokens,
    engine.Overloaded: exceptions.TokenOverload,
    engine.EngineUnavailable: exceptions.Unavailable,
    engine.EngineFailed: exceptions.EngineError,
}


def error_response(
    error: ServiceError | int,
    loc: Sequence[str | int] = ("request",),
    msg: str = "",
    kind: str = "",
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error body of ``error``, with its status and headers; counted by its type.

    ``error_response(status, loc, msg, kind)`` answers an error that no exception stands for
    (a 404 of a route's own) in the same body, counted the same way."""
    if isinstance(error, int):
        error = ServiceError(msg, loc=loc, status=error, kind=kind, headers=headers)
    metrics.REJECTED.labels(error.type).inc()
    return JSONResponse(status_code=error.status, content={"detail": error.detail()}, headers=dict(error.headers))


def as_service_error(exc: Exception) -> ServiceError:
    """``exc`` in the service's vocabulary: a :class:`ServiceError` as it is, FastAPI's
    validation error as :class:`~service.exceptions.InvalidRequest`, an engine exception by
    :data:`ENGINE_ERRORS`."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, RequestValidationError):
        return InvalidRequest(exc.errors())
    for cls in type(exc).__mro__:
        if cls in ENGINE_ERRORS:
            return ENGINE_ERRORS[cls](str(exc))
    raise TypeError(f"{type(exc).__name__} is not an error of the service's vocabulary") from exc


async def handle(request: Request, exc: Exception) -> JSONResponse:
    """The exception handler of every error a route can raise."""
    return error_response(as_service_error(exc))


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
    """Answer every error of the vocabulary, FastAPI's validation errors and the engine's
    exceptions with :func:`error_response`."""
    for exc in (ServiceError, RequestValidationError, *ENGINE_ERRORS):
        app.add_exception_handler(exc, handle)
