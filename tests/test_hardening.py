"""Hardening with an engine double: admission control, deadlines, disconnects, body limits,
API keys, request ids and logs, hostile input, and schema fuzzing. (Engine death, prompt
injection through the real model and the soak run are in tests/test_service.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from bench.launcher import free_port
from service import logs
from service.api import create_app
from service.predictor import Predictor
from service.settings import Settings
from service.spec import Demonstrations, ServingSpec
from tests.doubles import FakeEngine, SlowEngine

DIALOGUE = {"dialogue": {"turns": [{"speaker": "Ann", "text": "I can't believe it!"}]}}


def make_app(engine=None, **settings):
    engine = engine or FakeEngine()
    app = create_app(Settings(**settings), loader=_noop)
    state = app.state.service
    state.engine = engine
    state.predictor = Predictor(
        app_settings(app, settings), ServingSpec(demonstrations=Demonstrations(k=0), model_name="fake"), engine, {}
    )
    return app


def app_settings(app, overrides) -> Settings:
    return Settings(**overrides)


async def _noop(settings, state) -> None:
    return None


def concurrently(client: TestClient, calls: list[tuple[str, dict, dict]]) -> list[httpx.Response]:
    """Send requests at the same time through the app's own event loop."""

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://test") as c:
            return await asyncio.gather(*(c.post(path, json=body, headers=headers) for path, body, headers in calls))

    return client.portal.call(run)


def test_admission_control_429_with_retry_after():
    engine = SlowEngine(0.5)
    with TestClient(make_app(engine, max_inflight=2)) as client:
        responses = concurrently(client, [("/predict", DIALOGUE, {})] * 5)
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 429, 429, 429]
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "1" and "ERC_MAX_INFLIGHT" in refused.json()["detail"][0]["msg"]
        assert 'erc_rejected_requests_total{reason="overload"} 3.0' in client.get("/metrics").text
        # Capacity comes back once the work is done: nothing stays counted.
        assert client.post("/predict", json=DIALOGUE).status_code == 200


def test_deadline_504_aborts_the_engine_work():
    engine = SlowEngine(5.0)
    with TestClient(make_app(engine, request_timeout_s=30)) as client:
        start = time.monotonic()
        response = client.post("/predict", json=DIALOGUE, headers={"X-Request-Timeout": "0.2"})
        assert response.status_code == 504 and time.monotonic() - start < 3
        assert "deadline of 0.2 s" in response.json()["detail"][0]["msg"]
        assert engine.cancelled == 1 and engine.active == 0
        bad = client.post("/predict", json=DIALOGUE, headers={"X-Request-Timeout": "soon-<script>"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "x-request-timeout"]
        assert "script" not in bad.text  # the header is not echoed
    with TestClient(make_app(SlowEngine(5.0), request_timeout_s=0.3)) as client:
        assert client.post("/predict", json=DIALOGUE).status_code == 504


def test_client_disconnect_aborts_the_engine_work():
    engine = SlowEngine(10.0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(engine), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://127.0.0.1:{port}/predict", json=DIALOGUE, timeout=0.5)
        deadline = time.monotonic() + 5
        while engine.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.cancelled == 1 and engine.active == 0
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_an_engine_that_dies_mid_request_is_a_500_not_a_retryable_503():
    """503 means refused before any work (a balancer may replay it elsewhere); an engine that
    dies while serving a request may have been killed by it, so that is a 500."""
    from service.engine import EngineFailed

    class Dying(FakeEngine):
        async def classify(self, prompts, labels, decoding=None, priority=0):
            raise EngineFailed("the engine died while serving this request; it is not retried here")

    with TestClient(make_app(Dying())) as client:
        response = client.post("/predict", json=DIALOGUE)
        assert response.status_code == 500 and "retry-after" not in response.headers
        assert response.json()["detail"][0]["type"] == "engine_failed"
        assert 'erc_rejected_requests_total{reason="engine_failed"}' in client.get("/metrics").text


def test_validation_errors_are_capped():
    """20,000 wrong-typed turns in 40 KB: one error (the list's ceiling), not an answer 74x the
    body; many wrong items under the ceilings: 10 errors and a count."""
    with TestClient(make_app()) as client:
        turns = [{"speaker": 1, "text": 2}] * 20000
        response = client.post("/predict", json={"dialogue": {"turns": turns}})
        assert response.status_code == 422 and len(response.content) < 1000
        [error] = response.json()["detail"]
        assert error["loc"] == ["body", "dialogue", "turns"] and "at most 1000" in error["msg"]
        dialogues = [{"turns": [{"speaker": 1, "text": 2}] * 100}] * 200
        response = client.post("/predict_dialogue", json={"dialogues": dialogues})
        detail = response.json()["detail"]
        assert response.status_code == 422 and len(detail) == 11 and len(response.content) < 3000
        assert detail[-1] == {
            "loc": ["body"],
            "msg": "39990 more errors not shown (40000 in all)",
            "type": "too_many_errors",
        }
        # 150 dialogues of 1,000 wrong turns (4 MB, under the body limit): counted before any
        # turn is validated, one error instead of 300,000 built to report 10.
        dialogues = [{"turns": [{"speaker": 1, "text": 2}] * 1000}] * 150
        response = client.post("/predict_dialogue", json={"dialogues": dialogues})
        [error] = response.json()["detail"]
        assert response.status_code == 422 and len(response.content) < 1000
        assert "150000 turns in all, over the ceiling of 20000" in error["msg"], error


def test_body_limits():
    with TestClient(make_app(max_body_bytes=2048)) as client:
        big = {"dialogue": {"turns": [{"speaker": "a", "text": "x" * 4000}]}}
        response = client.post("/predict", json=big)
        assert response.status_code == 413
        assert "exceeds the limit of 2048 (ERC_MAX_BODY_BYTES)" in response.json()["detail"][0]["msg"]

        def chunks(body: bytes, size: int = 512):
            for i in range(0, len(body), size):
                yield body[i : i + size]

        # Without a Content-Length the bytes are counted as they arrive.
        small = client.post(
            "/predict", content=chunks(json.dumps(DIALOGUE).encode()), headers={"content-type": "application/json"}
        )
        assert small.status_code == 200
        chunked = client.post(
            "/predict", content=chunks(json.dumps(big).encode()), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413 and "more than 2048" in chunked.json()["detail"][0]["msg"]


class _Server:
    """The app under a real uvicorn on loopback, for tests that need raw sockets."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_Server":
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def raw(self, head: bytes, body_parts: list[bytes] = (), pause: float = 0.0) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(head)
            for part in body_parts:
                time.sleep(pause)
                try:
                    sock.sendall(part)
                except OSError:  # the server answered and closed: read what it said
                    break
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and b'"}]}' in out:
                    break
            return out


@pytest.mark.parametrize("encoding", [b"chunked", b"Chunked", b"CHUNKED"])
def test_chunked_bodies_over_the_limit_are_stopped_whatever_the_header_case(encoding):
    """8 MiB sent chunked with a 4 MiB limit: a 413 once the limit is crossed, without reading
    (or parsing) the rest."""
    with _Server(make_app()) as server:
        head = (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: "
            + encoding
            + b"\r\n\r\n"
        )
        block = b"x" * (1024 * 1024)
        parts = [b"%x\r\n%s\r\n" % (len(block), block) for _ in range(8)] + [b"0\r\n\r\n"]
        answer = server.raw(head, parts)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert b"more than 4194304" in answer


def test_a_slow_body_gets_408_and_holds_no_inflight_slot():
    engine = FakeEngine()
    app = make_app(engine, max_inflight=1, body_timeout_s=1.0)
    with _Server(app) as server:
        body = json.dumps(DIALOGUE).encode()
        head = (
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % len(body)
        )
        result: dict = {}
        slow = threading.Thread(target=lambda: result.update(answer=server.raw(head, [body[:5]])))
        slow.start()
        time.sleep(0.3)
        # The trickling client holds no slot: with ERC_MAX_INFLIGHT=1 another request is served.
        assert httpx.post(f"http://127.0.0.1:{server.port}/predict", json=DIALOGUE, timeout=5).status_code == 200
        slow.join(timeout=10)
        assert result["answer"].startswith(b"HTTP/1.1 408"), result["answer"][:200]
        assert b"ERC_BODY_TIMEOUT_S" in result["answer"]
        assert app.state.service.inflight == 0


def test_api_keys(tmp_path, caplog):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated 2026-11-26\n\nfile-key-0123456789\n")
    with TestClient(make_app(api_keys="alpha-key-0123456789,beta-key-0123456789", api_keys_file=keys_file)) as client:
        caplog.set_level(logging.DEBUG)
        assert client.post("/predict", json=DIALOGUE).status_code == 401
        wrong = client.post("/predict", json=DIALOGUE, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert (
            client.post("/predict", json=DIALOGUE, headers={"Authorization": "Basic beta-key-0123456789"}).status_code
            == 401
        )
        assert (
            client.post("/predict", json=DIALOGUE, headers={"Authorization": "Bearer # rotated 2026-11-26"}).status_code
            == 401
        )
        for key in ("alpha-key-0123456789", "beta-key-0123456789", "file-key-0123456789"):
            assert client.post("/predict", json=DIALOGUE, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.post("/predict_dialogue", json={"dialogues": [DIALOGUE["dialogue"]]}).status_code == 401
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    assert "alpha-key" not in caplog.text and "beta-key" not in caplog.text
    assert "alpha-key" not in repr(Settings(api_keys="alpha-key-0123456789"))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"api_keys": " "}, "ERC_API_KEYS is set but holds no key"),
        ({"api_keys": " , ,"}, "ERC_API_KEYS is set but holds no key"),
        ({"api_keys_file": "blank"}, "ERC_API_KEYS_FILE"),
        ({"api_keys": "short"}, "key number 1 is shorter than 16 characters (ERC_API_KEY_MIN_LENGTH)"),
    ],
)
def test_unusable_api_keys_stop_the_start(tmp_path, settings, words):
    """Fail closed: a blank key list (a templated Secret that rendered empty) must never turn
    authentication off."""
    from service.security import KeyConfigError

    if settings.get("api_keys_file") == "blank":
        path = tmp_path / "keys"
        path.write_text("\n   \n# only a comment\n")
        settings = {"api_keys_file": path}
    with pytest.raises(KeyConfigError) as info:
        create_app(Settings(**settings), loader=_noop)
    assert words in str(info.value) and "short" not in str(info.value).replace("shorter", "")


def test_erc_serve_refuses_to_start_with_blank_keys():
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--port", "1"],
        env={**os.environ, "ERC_API_KEYS": " "},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # 78 (EX_CONFIG): a restart with the same settings cannot help, and the message says so.
    assert out.returncode == 78, out.stderr
    assert "not starting: ERC_API_KEYS is set but holds no key" in out.stderr
    assert "a restart will not fix this" in out.stderr


def test_keys_file_is_reloaded_without_a_restart(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("old-key-0123456789\n")
    with TestClient(make_app(api_keys_file=keys_file)) as client:
        ring = client.app.state.keys
        ring.check_every_s = 0.0

        def status(key: str) -> int:
            return client.post("/predict", json=DIALOGUE, headers={"Authorization": f"Bearer {key}"}).status_code

        assert status("old-key-0123456789") == 200 and status("new-key-0123456789") == 401
        keys_file.write_text("new-key-0123456789\n")
        os_stat = keys_file.stat()
        import os

        os.utime(keys_file, ns=(os_stat.st_atime_ns, os_stat.st_mtime_ns + 10**9))
        assert status("new-key-0123456789") == 200 and status("old-key-0123456789") == 401
        # A rotation that leaves the file blank keeps the keys in force (fail closed, logged).
        keys_file.write_text("\n")
        os.utime(keys_file, ns=(os_stat.st_atime_ns, os_stat.st_mtime_ns + 2 * 10**9))
        assert status("new-key-0123456789") == 200 and status("anything-at-all-0123") == 401


def test_request_id_and_json_logs_without_text(capsys):
    logs.configure(json_logs=True)
    try:
        with TestClient(make_app()) as client:
            secret = "my very private utterance"
            body = {"dialogue": {"turns": [{"speaker": "Ann", "text": secret}]}}
            given = client.post("/predict", json=body, headers={"X-Request-ID": "req-123"})
            assert given.headers["x-request-id"] == "req-123"
            made = client.post("/predict", json=body)
            assert len(made.headers["x-request-id"]) == 32
    finally:
        for name in ("service", "uvicorn", "uvicorn.error"):
            logging.getLogger(name).handlers = []
            logging.getLogger(name).propagate = True
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    mine = [r for r in records if r.get("request_id") == "req-123"]
    assert mine and mine[0]["message"] == "request" and mine[0]["status"] == 200 and mine[0]["path"] == "/predict"
    assert secret not in err


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"dialogue": {"turns": [{"speaker": "a", "text": "x\\ud800"}]}}', 422),  # lone surrogate
        (b"[" * 50000 + b"]" * 50000, 400),  # deep JSON
        (b'{"a":' * 20000 + b"1" + b"}" * 20000, 400),
        (b'{"dialogue": {"turns": "many"}}', 422),
        (b'{"dialogue": {"turns": [{"speaker": ["a"], "text": {"t": 1}}]}}', 422),
        (b'{"dialogue": null}', 422),
        (b"\xff\xfe garbage", 422),
        ('{"dialogue": {"turns": [{"speaker": "a", "text": "'.encode() + b"y" * 100000 + b'"}]}}', 422),
    ],
)
def test_hostile_input_gets_a_4xx_and_the_service_stays_up(content, status):
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        response = client.post("/predict", content=content, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text[:300]
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "text",
    ["مرحبا بالعالم \u202eabc", "😊🔥👍🏽 family: 👨‍👩‍👧", "nul\x00inside", "tab\tand\nnewline", "ｆｕｌｌ ｗｉｄｔｈ"],
)
def test_unicode_edge_cases_are_served(text):
    engine = FakeEngine()
    with TestClient(make_app(engine)) as client:
        response = client.post("/predict", json={"dialogue": {"turns": [{"speaker": "أحمد", "text": text}]}})
        assert response.status_code == 200
        assert sum(response.json()["scores"].values()) == pytest.approx(1.0)
        assert "\t" not in engine.calls[0][0].split("### ")[1].replace("\t Speaker_0", "")


def test_schema_fuzzing_no_5xx_and_responses_match_the_schema():
    import schemathesis
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
    from hypothesis import HealthCheck, given, settings

    app = make_app()
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    ran = 0
    for operation in schema.get_all_operations():
        op = operation.ok()

        @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case):
            nonlocal ran
            ran += 1
            response = case.call()
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))
            else:
                # Limits that are settings (turns, characters, target range) cannot be written
                # into the schema, so a schema-valid request may rightly get 422: check that
                # every response matches its documented schema, not that all data is accepted.
                case.validate_response(
                    response,
                    checks=[
                        not_a_server_error,
                        response_schema_conformance,
                        status_code_conformance,
                        content_type_conformance,
                    ],
                )

        check()
    assert ran >= 100
    assert failures == []


def test_token_budget_admits_the_first_request_whatever_its_size_then_counts_work():
    from service.engine import Overloaded, TokenBudget

    budget = TokenBudget(1000)
    budget.acquire(5000)  # alone it is admitted (ERC_MAX_REQUEST_TOKENS bounds it instead)
    with pytest.raises(Overloaded, match="5000 prompt tokens in flight and this request brings 10"):
        budget.acquire(10)
    budget.release(5000)
    budget.acquire(600)
    budget.acquire(400)
    with pytest.raises(Overloaded, match="ERC_MAX_INFLIGHT_TOKENS"):
        budget.acquire(1)
    budget.release(600)
    budget.release(400)
    assert budget.used == 0


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [("Overloaded", 429, "overload_tokens"), ("TooMuchWork", 422, "too_many_tokens")],
)
def test_work_refusals_answer_in_the_one_error_body(error, status, kind):
    from service import engine as engine_module

    exc = getattr(engine_module, error)

    class Refusing(FakeEngine):
        async def classify(self, prompts, labels, decoding=None, priority=0):
            raise exc("work limit (ERC_MAX_INFLIGHT_TOKENS)")

    with TestClient(make_app(Refusing())) as client:
        response = client.post("/predict", json=DIALOGUE)
        assert response.status_code == status and response.json()["detail"][0]["type"] == kind
        assert (response.headers.get("retry-after") == "1") == (status == 429)
