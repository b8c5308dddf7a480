"""The service's one error vocabulary.

Every failure a request can meet is a :class:`ServiceError`, which carries what its answer says:
the HTTP ``status``, a machine-readable ``type``, ``loc`` (where in the request:
``("body", field, ...)``, ``("header", name)`` or ``("request",)``) and response headers. No web
framework is imported here, so the predictor raises these as well as the HTTP layer does;
:func:`service.errors.error_response` turns any of them into the one error body
``{"detail": [{"loc", "msg", "type"}, ...]}`` and counts it by its type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from service.schemas import MAX_REPORTED_ERRORS

Loc = tuple[str | int, ...]

_NONE: Mapping[str, str] = MappingProxyType({})


class ServiceError(Exception):
    """A request answered with an error. Subclasses fix ``status``, ``type``, the default
    ``loc`` and ``headers``; an instance may set any of them (an answer no subclass names)."""

    status: int = 500
    type: str = "internal"
    loc: Loc = ("request",)
    headers: Mapping[str, str] = _NONE

    def __init__(
        self,
        message: str,
        *,
        loc: Sequence[str | int] | None = None,
        status: int | None = None,
        kind: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if loc is not None:
            self.loc = tuple(loc)
        if status is not None:
            self.status = status
        if kind is not None:
            self.type = kind
        if headers is not None:
            self.headers = headers

    def detail(self) -> list[dict[str, Any]]:
        """The items of the error body's ``detail``."""
        return [{"loc": list(self.loc), "msg": self.message, "type": self.type}]


class InvalidRequest(ServiceError):
    """The request does not match its schema: one item per error, each with pydantic's own
    type; the first :data:`~service.schemas.MAX_REPORTED_ERRORS` are shown, the rest counted
    (a body of many wrong items would otherwise get an answer tens of times its own size). The
    input itself is never echoed: it can be megabytes, or text that cannot be encoded."""

    status, type = 422, "invalid_request"
    loc = ("body",)

    def __init__(self, errors: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation errors")
        self.errors = list(errors)

    def detail(self) -> list[dict[str, Any]]:
        shown = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in self.errors[:MAX_REPORTED_ERRORS]
        ]
        if len(self.errors) > MAX_REPORTED_ERRORS:
            more = len(self.errors) - MAX_REPORTED_ERRORS
            shown.append(
                {
                    "loc": list(self.loc),
                    "msg": f"{more} more errors not shown ({len(self.errors)} in all)",
                    "type": "too_many_errors",
                }
            )
        return shown


class LimitError(ServiceError):
    """A request over a configured limit (422); ``field`` is the path of the offending value in
    the request body, e.g. ``("dialogue", "turns", 3, "text")``."""

    status, type = 422, "limit_exceeded"
    loc = ("body",)

    def __init__(self, message: str, field: Sequence[str | int] = ()) -> None:
        super().__init__(message, loc=("body", *field))


class LabelSetUnavailable(LimitError):
    """The label set asked for is not served by this model (not trained on it, or its index is
    missing)."""

    type = "label_set_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, ("label_set",))


class PromptTooLong(LimitError):
    """A rendered prompt longer than the engine's context."""

    type = "prompt_too_long"


class TooManyTokens(LimitError):
    """One request's prompts hold more tokens than ``ERC_MAX_REQUEST_TOKENS``: it would never be
    admitted, so waiting would not help."""

    type = "too_many_tokens"


class HeaderError(ServiceError):
    """A request header whose value is out of its bounds (422)."""

    status, type = 422, "limit_exceeded"

    def __init__(self, message: str, header: str) -> None:
        super().__init__(message, loc=("header", header))


class Unauthorized(ServiceError):
    """Missing or wrong API key."""

    status, type = 401, "unauthorized"
    headers = MappingProxyType({"WWW-Authenticate": "Bearer"})
    loc = ("header", "authorization")


class BodyTimeout(ServiceError):
    """The body did not arrive within ``ERC_BODY_TIMEOUT_S``."""

    status, type = 408, "body_timeout"
    headers = MappingProxyType({"Connection": "close"})
    loc = ("body",)


class BodyTooLarge(ServiceError):
    """The body is over ``ERC_MAX_BODY_BYTES`` (declared or counted as it arrives)."""

    status, type = 413, "body_too_large"
    loc = ("body",)


class Overload(ServiceError):
    """Over ``ERC_MAX_INFLIGHT`` requests in flight: retry shortly."""

    status, type = 429, "overload"
    headers = MappingProxyType({"Retry-After": "1"})


class TokenOverload(Overload):
    """Over ``ERC_MAX_INFLIGHT_TOKENS`` prompt tokens admitted to the engine: retry shortly."""

    type = "overload_tokens"


class ClientGone(ServiceError):
    """The client disconnected; its engine work was aborted. 499 is nginx's code for it: nobody
    reads the answer, it is kept for the logs and the metrics."""

    status, type = 499, "client_gone"


class EngineError(ServiceError):
    """The engine failed while serving this request (not safe to replay blindly)."""

    status, type = 500, "engine_failed"


class Unavailable(ServiceError):
    """Refused before any work (loading, or the engine is dead): safe for a balancer to retry
    elsewhere."""

    status, type = 503, "unavailable"
    headers = MappingProxyType({"Retry-After": "5"})


class Draining(Unavailable):
    """This replica is shutting down (SIGTERM): retry on another."""

    type = "draining"
    headers = MappingProxyType({"Retry-After": "1", "Connection": "close"})


class DeadlineExceeded(ServiceError):
    """The request's deadline passed; its engine work was aborted."""

    status, type = 504, "deadline"
