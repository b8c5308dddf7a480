"""A Python client for the service's HTTP API: :class:`ERCClient` (blocking) and
:class:`AsyncERCClient` (asyncio), both on httpx, returning the protocol's own pydantic types.

Retry rules follow the service's semantics (docs/operations.md, "Retries"): ``429`` (overloaded) and
``503`` (loading, draining, engine already dead) are refusals before any work, retried after the
server's ``Retry-After``, within a bounded budget (:class:`RetryPolicy`); a connection that could
not be opened is retried the same way (no request reached a server). ``500`` means the work had
started (an engine that died under it): never replayed. Anything else is raised at once as
:class:`ERCHTTPError`, whose ``detail`` holds the service's ``detail`` (for a 422, the fields and
limits). The API key comes from ``api_key=`` or the ``ERC_API_KEY`` environment variable and is
sent as ``Authorization: Bearer``; it is never part of a message or a repr.

This module imports httpx and the protocol types only: the serving runtime never imports it.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import httpx

from service.schemas import (
    DialogueIn,
    HealthResponse,
    PredictDialogueRequest,
    PredictDialogueResponse,
    PredictRequest,
    PredictResponse,
)

#: Where the key is read from when ``api_key`` is not given.
API_KEY_ENV = "ERC_API_KEY"
#: Refusals before any work: safe to send again.
RETRIED_STATUSES = frozenset({429, 503})

#: A dialogue as the API takes it: the protocol type or its JSON shape (``{"id"?, "turns": [...]}``).
DialogueLike = Union[DialogueIn, Mapping[str, Any]]


class ERCError(Exception):
    """Base class of the client's errors."""


class ERCHTTPError(ERCError):
    """The service answered with an error status (after the retries it allows, for 429/503)."""

    def __init__(self, status: int, message: str, detail: Any = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.request_id = request_id


class ERCConnectionError(ERCError):
    """No connection to the service could be opened within the retry budget."""


@dataclass(frozen=True)
class RetryPolicy:
    """How 429, 503 and refused connections are retried: at most ``attempts`` tries in all
    (the first included; None: as many as the time budget allows) and at most ``budget_s``
    seconds of waiting in all; each wait is the server's ``Retry-After`` (``default_wait_s``
    without one), capped at ``max_wait_s``."""

    attempts: int | None = 8
    budget_s: float = 120.0
    default_wait_s: float = 1.0
    max_wait_s: float = 30.0

    @classmethod
    def never(cls) -> "RetryPolicy":
        """No retries: every refusal is raised (what a benchmark that counts them wants)."""
        return cls(attempts=1, budget_s=0.0)


@dataclass
class ClientStats:
    """What a client has sent: requests (each try counts) and retries per cause (429, 503,
    ``connect``)."""

    requests: int = 0
    retries: dict[str, int] = field(default_factory=dict)

    def retried(self, cause: str) -> None:
        self.retries[cause] = self.retries.get(cause, 0) + 1


def retry_after_s(value: str | None, default: float) -> float:
    """Seconds a ``Retry-After`` header asks for: a number of seconds or an HTTP date."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


def _error(response: httpx.Response, retried: int) -> ERCHTTPError:
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        said = "; ".join(
            f"{'.'.join(str(x) for x in item.get('loc', []))}: {item.get('msg')}"
            for item in detail
            if isinstance(item, dict)
        )
    else:
        said = str(detail) if detail is not None else response.reason_phrase
    after = f" after {retried} retries" if retried else ""
    return ERCHTTPError(
        response.status_code,
        f"{response.request.method} {response.request.url.path}: {response.status_code}{after}: {said}",
        detail,
        response.headers.get("x-request-id"),
    )


class _Common:
    """What both clients share: the request bodies, the headers and the retry decisions."""

    def __init__(
        self,
        api_key: str | None,
        retry: RetryPolicy,
        request_timeout_s: float | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.headers = dict(headers or {})
        if key and key.strip():
            self.headers["Authorization"] = f"Bearer {key.strip()}"
        if request_timeout_s is not None:
            # The server aborts the engine's work past this and answers 504.
            self.headers["X-Request-Timeout"] = f"{request_timeout_s:g}"
        self.retry = retry
        self.stats = ClientStats()

    @staticmethod
    def predict_body(dialogue: DialogueLike, target: int | None, label_set: str | None) -> dict[str, Any]:
        request = PredictRequest(dialogue=_dialogue(dialogue), target=target, label_set=label_set)
        return request.model_dump(mode="json", exclude_none=True, exclude_defaults=True)

    @staticmethod
    def predict_dialogue_body(dialogues: Sequence[DialogueLike], label_set: str | None) -> dict[str, Any]:
        request = PredictDialogueRequest(dialogues=[_dialogue(d) for d in dialogues], label_set=label_set)
        return request.model_dump(mode="json", exclude_none=True)

    def wait_after(self, cause: str, retry_after: str | None, attempt: int, waited: float) -> float | None:
        """Seconds to wait before the next try, or None when the budget is spent."""
        policy = self.retry
        wait = min(retry_after_s(retry_after, policy.default_wait_s), policy.max_wait_s)
        if (policy.attempts is not None and attempt + 1 >= policy.attempts) or waited + wait > policy.budget_s:
            return None
        self.stats.retried(cause)
        return wait

    def give_up_connecting(self, exc: Exception, tries: int) -> ERCConnectionError:
        return ERCConnectionError(f"could not connect after {tries} tries: {type(exc).__name__}: {exc}")


def _dialogue(dialogue: DialogueLike) -> DialogueIn:
    return dialogue if isinstance(dialogue, DialogueIn) else DialogueIn.model_validate(dict(dialogue))


def _timeout(timeout: float | httpx.Timeout) -> httpx.Timeout:
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout, connect=min(10.0, timeout))


class ERCClient:
    """Blocking client. ``timeout`` is httpx's (seconds per read; default above the server's own
    120 s deadline); ``request_timeout_s`` asks the server for a shorter deadline
    (``X-Request-Timeout``). Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 150.0,
        request_timeout_s: float | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._common = _Common(api_key, retry, request_timeout_s, headers)
        limits = httpx.Limits(max_connections=max_connections) if max_connections else httpx.Limits()
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=_timeout(timeout),
            headers=self._common.headers,
            limits=limits,
            transport=transport,
        )

    @property
    def stats(self) -> ClientStats:
        return self._common.stats

    def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        common, waited, attempt = self._common, 0.0, 0
        while True:
            common.stats.requests += 1
            try:
                response = self._http.post(path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                wait = common.wait_after("connect", None, attempt, waited)
                if wait is None:
                    raise common.give_up_connecting(exc, attempt + 1) from exc
            else:
                if response.status_code not in RETRIED_STATUSES:
                    if response.is_error:
                        raise _error(response, attempt)
                    return response
                cause, after = str(response.status_code), response.headers.get("retry-after")
                wait = common.wait_after(cause, after, attempt, waited)
                if wait is None:
                    raise _error(response, attempt)
            time.sleep(wait)
            waited += wait
            attempt += 1

    def predict(
        self, dialogue: DialogueLike, target: int | None = None, label_set: str | None = None
    ) -> PredictResponse:
        """The label of turn ``target`` (default: the last) of ``dialogue``."""
        body = self._common.predict_body(dialogue, target, label_set)
        return PredictResponse.model_validate(self._post("/predict", body).json())

    def predict_dialogue(
        self, dialogues: Sequence[DialogueLike], label_set: str | None = None
    ) -> PredictDialogueResponse:
        """The label of every utterance of every dialogue, in input order."""
        body = self._common.predict_dialogue_body(dialogues, label_set)
        return PredictDialogueResponse.model_validate(self._post("/predict_dialogue", body).json())

    def ready(self) -> HealthResponse:
        """``GET /ready`` as it answers (status ``ok`` with the label sets served, or why not)."""
        return HealthResponse.model_validate(self._http.get("/ready").json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ERCClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncERCClient:
    """The asyncio client: the same methods, awaited; one instance serves many concurrent calls
    (``max_connections`` caps its connection pool)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 150.0,
        request_timeout_s: float | None = None,
        retry: RetryPolicy = RetryPolicy(),
        max_connections: int | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._common = _Common(api_key, retry, request_timeout_s, headers)
        limits = httpx.Limits(max_connections=max_connections) if max_connections else httpx.Limits()
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=_timeout(timeout),
            headers=self._common.headers,
            limits=limits,
            transport=transport,
        )

    @property
    def stats(self) -> ClientStats:
        return self._common.stats

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        common, waited, attempt = self._common, 0.0, 0
        while True:
            common.stats.requests += 1
            try:
                response = await self._http.post(path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                wait = common.wait_after("connect", None, attempt, waited)
                if wait is None:
                    raise common.give_up_connecting(exc, attempt + 1) from exc
            else:
                if response.status_code not in RETRIED_STATUSES:
                    if response.is_error:
                        raise _error(response, attempt)
                    return response
                cause, after = str(response.status_code), response.headers.get("retry-after")
                wait = common.wait_after(cause, after, attempt, waited)
                if wait is None:
                    raise _error(response, attempt)
            await asyncio.sleep(wait)
            waited += wait
            attempt += 1

    async def predict(
        self, dialogue: DialogueLike, target: int | None = None, label_set: str | None = None
    ) -> PredictResponse:
        body = self._common.predict_body(dialogue, target, label_set)
        return PredictResponse.model_validate((await self._post("/predict", body)).json())

    async def predict_dialogue(
        self, dialogues: Sequence[DialogueLike], label_set: str | None = None
    ) -> PredictDialogueResponse:
        body = self._common.predict_dialogue_body(dialogues, label_set)
        return PredictDialogueResponse.model_validate((await self._post("/predict_dialogue", body)).json())

    async def ready(self) -> HealthResponse:
        return HealthResponse.model_validate((await self._http.get("/ready")).json())

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncERCClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
