"""service/client.py against a scripted transport: typed answers, the retry rules (429/503 after
Retry-After within a budget, 500 never, refused connections), the API key, and the imports
the serving runtime must not pull in."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from service.client import (
    AsyncERCClient,
    ERCClient,
    ERCConnectionError,
    ERCHTTPError,
    RetryPolicy,
    retry_after_s,
)
from service.schemas import PredictDialogueResponse, PredictResponse

DIALOGUE = {"id": "d1", "turns": [{"speaker": "a", "text": "Hi!"}, {"speaker": "b", "text": "Hello."}]}
SCORES = {"neutral": 0.9, "joyful": 0.1}
PREDICT = {"label": "neutral", "scores": SCORES, "id": "d1", "target": 1, "label_set": "meld", "model": "m"}
BATCH = {
    "results": [{"id": "d1", "predictions": [{"label": "neutral", "scores": SCORES}] * 2}],
    "label_set": "meld",
    "model": "m",
}
FAST = RetryPolicy(attempts=4, budget_s=1.0, default_wait_s=0.01)


class Script:
    """Answers requests from a list of (status, headers, body), recording what was sent."""

    def __init__(self, *answers: tuple[int, dict, dict]) -> None:
        self.answers = list(answers)
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        status, headers, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return httpx.Response(status, headers=headers, json=body)


def test_predict_returns_the_typed_answer_and_sends_the_protocol_body():
    script = Script((200, {}, PREDICT))
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=FAST) as client:
        answer = client.predict(DIALOGUE, target=1, label_set="meld")
    assert isinstance(answer, PredictResponse) and answer.label == "neutral" and answer.scores == SCORES
    sent = json.loads(script.sent[0].content)
    assert sent == {"dialogue": DIALOGUE, "target": 1, "label_set": "meld"}
    assert script.sent[0].url.path == "/predict"


def test_predict_dialogue_is_typed_and_a_bad_label_set_fails_before_sending():
    script = Script((200, {}, BATCH))
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=FAST) as client:
        answer = client.predict_dialogue([DIALOGUE])
        assert isinstance(answer, PredictDialogueResponse)
        assert [p.label for p in answer.results[0].predictions] == ["neutral", "neutral"]
        with pytest.raises(ValueError, match="unknown label set"):
            client.predict_dialogue([DIALOGUE], label_set="nope")
    assert len(script.sent) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_overload_and_unavailable_are_retried_after_retry_after(status):
    script = Script((status, {"Retry-After": "0"}, {"detail": []}), (status, {}, {"detail": []}), (200, {}, PREDICT))
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=FAST) as client:
        assert client.predict(DIALOGUE).label == "neutral"
        assert client.stats.retries == {str(status): 2} and client.stats.requests == 3


def test_retries_stop_at_the_budget_and_raise_the_last_refusal():
    script = Script((429, {"Retry-After": "0"}, {"detail": [{"loc": ["request"], "msg": "busy", "type": "overload"}]}))
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=FAST) as client:
        with pytest.raises(ERCHTTPError) as caught:
            client.predict(DIALOGUE)
    assert caught.value.status == 429 and "after 3 retries" in str(caught.value) and "busy" in str(caught.value)
    assert len(script.sent) == FAST.attempts
    # A Retry-After longer than the time budget left is not waited for.
    script = Script((503, {"Retry-After": "5"}, {"detail": "draining"}))
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=FAST) as client:
        with pytest.raises(ERCHTTPError, match="503"):
            client.predict(DIALOGUE)
    assert len(script.sent) == 1


def test_a_500_is_never_retried_and_a_422_names_the_field():
    script = Script((500, {}, {"detail": [{"loc": ["request"], "msg": "the engine died", "type": "engine"}]}))
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=FAST) as client:
        with pytest.raises(ERCHTTPError) as caught:
            client.predict_dialogue([DIALOGUE])
    assert caught.value.status == 500 and len(script.sent) == 1
    detail = [{"loc": ["body", "dialogues", 0, "turns"], "msg": "201 turns exceed the limit of 200", "type": "x"}]
    script = Script((422, {}, {"detail": detail}))
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=FAST) as client:
        with pytest.raises(ERCHTTPError) as caught:
            client.predict_dialogue([DIALOGUE])
    assert caught.value.detail == detail and "body.dialogues.0.turns: 201 turns" in str(caught.value)
    assert len(script.sent) == 1


def test_api_key_from_the_argument_or_the_environment_never_in_messages(monkeypatch):
    script = Script((401, {}, {"detail": [{"loc": ["header", "authorization"], "msg": "bad key", "type": "x"}]}))
    monkeypatch.setenv("ERC_API_KEY", "env-key-0123456789")
    with ERCClient("http://erc", transport=httpx.MockTransport(script)) as client:
        with pytest.raises(ERCHTTPError) as caught:
            client.predict(DIALOGUE)
    assert script.sent[0].headers["authorization"] == "Bearer env-key-0123456789"
    assert "env-key" not in str(caught.value) and "env-key" not in repr(client.__dict__)
    with ERCClient("http://erc", api_key="arg-key-0123456789", transport=httpx.MockTransport(script)) as client:
        with pytest.raises(ERCHTTPError):
            client.predict(DIALOGUE)
    assert script.sent[1].headers["authorization"] == "Bearer arg-key-0123456789"
    monkeypatch.delenv("ERC_API_KEY")
    with ERCClient("http://erc", transport=httpx.MockTransport(script), request_timeout_s=5) as client:
        with pytest.raises(ERCHTTPError):
            client.predict(DIALOGUE)
    assert "authorization" not in script.sent[2].headers and script.sent[2].headers["x-request-timeout"] == "5"


def test_refused_connections_are_retried_then_reported():
    tries = []

    def refuse(request: httpx.Request) -> httpx.Response:
        tries.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    with ERCClient("http://erc", transport=httpx.MockTransport(refuse), retry=FAST) as client:
        with pytest.raises(ERCConnectionError, match="after 4 tries"):
            client.predict(DIALOGUE)
    assert len(tries) == FAST.attempts and client.stats.retries == {"connect": 3}


def test_async_client_retries_concurrent_calls_like_the_blocking_one():
    script = Script((429, {"Retry-After": "0"}, {"detail": []}), (200, {}, BATCH))

    async def run():
        async with AsyncERCClient("http://erc", transport=httpx.MockTransport(script), retry=FAST) as client:
            answers = await asyncio.gather(*(client.predict_dialogue([DIALOGUE]) for _ in range(4)))
            return answers, client.stats

    answers, stats = asyncio.run(run())
    assert all(isinstance(a, PredictDialogueResponse) for a in answers)
    assert stats.retries == {"429": 1} and stats.requests == 5


def test_retry_after_takes_seconds_or_an_http_date():
    assert retry_after_s("3", 1.0) == 3.0 and retry_after_s(None, 1.5) == 1.5 and retry_after_s("soon", 2.0) == 2.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", 1.0) == 0.0


def test_the_serving_runtime_does_not_import_the_client():
    code = "import sys, service.api, service.server; print('service.client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    code = "import sys, service.client; print(sorted(m for m in sys.modules if m.startswith('service')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(eval(out)) <= {"service", "service.client", "service.schemas", "service.labels"}


def test_a_time_budget_alone_bounds_the_retries():
    script = Script(*[(429, {"Retry-After": "0"}, {"detail": []})] * 20, (200, {}, PREDICT))
    patient = RetryPolicy(attempts=None, budget_s=1.0)
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=patient) as client:
        assert client.predict(DIALOGUE).label == "neutral"
    assert client.stats.retries == {"429": 20}
    script = Script((503, {"Retry-After": "0.2"}, {"detail": []}))
    with ERCClient("http://erc", transport=httpx.MockTransport(script), retry=patient) as client:
        with pytest.raises(ERCHTTPError, match="503 after 5 retries"):
            client.predict(DIALOGUE)
