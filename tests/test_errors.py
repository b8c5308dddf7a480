"""One error vocabulary: every error answer is a ServiceError rendered by errors.error_response,
which counts it; the predictor takes and returns its own types and resolves a request's label set
once."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from fastapi.testclient import TestClient

from service import exceptions
from service.api import create_app
from service.data import Dialogue, Turn
from service.errors import ENGINE_ERRORS, as_service_error, error_response
from service.exceptions import LabelSetUnavailable, LimitError, ServiceError
from service.predictor import Answer, DialoguesAnswer, Predictor
from service.settings import Settings
from service.spec import Demonstrations, LabelSetSpec, ServingSpec
from tests.doubles import FakeEngine

DIALOGUE = {"dialogue": {"turns": [{"speaker": "Ann", "text": "I can't believe it!"}]}}


async def _noop(settings, state) -> None:
    return None


def _predictor(settings: Settings, engine=None) -> Predictor:
    spec = ServingSpec(label_sets={"meld": LabelSetSpec(demonstrations=Demonstrations(k=0))}, model_name="fake")
    return Predictor(settings, spec, engine or FakeEngine(), {})


def _client(**overrides) -> TestClient:
    settings = Settings(**overrides)
    app = create_app(settings, loader=_noop)
    app.state.service.engine = FakeEngine()
    app.state.service.predictor = _predictor(settings, app.state.service.engine)
    return TestClient(app)


def _rejected(client: TestClient, reason: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'erc_rejected_requests_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_every_error_class_carries_status_type_and_loc():
    classes = [c for c in vars(exceptions).values() if inspect.isclass(c) and issubclass(c, ServiceError)]
    assert len(classes) >= 15
    for cls in classes:
        assert 400 <= cls.status < 600 and cls.type and cls.loc, cls
    # The engine's own exceptions each have their word in the vocabulary.
    assert {e.__name__ for e in ENGINE_ERRORS} == {
        "PromptTooLong",
        "TooMuchWork",
        "Overloaded",
        "EngineUnavailable",
        "EngineFailed",
    }


def test_error_response_builds_the_one_body_and_counts_it():
    with _client() as client:
        before = _rejected(client, "limit_exceeded")
        response = error_response(LimitError("3 turns exceed the limit of 2 (ERC_MAX_TURNS)", ("dialogue", "turns")))
        assert response.status_code == 422
        assert response.body == (
            b'{"detail":[{"loc":["body","dialogue","turns"],'
            b'"msg":"3 turns exceed the limit of 2 (ERC_MAX_TURNS)","type":"limit_exceeded"}]}'
        )
        assert _rejected(client, "limit_exceeded") == before + 1


@pytest.mark.parametrize(
    ("body", "settings", "status", "reason", "loc"),
    [
        (DIALOGUE | {"label_set": "iemocap"}, {}, 422, "label_set_unavailable", ["body", "label_set"]),
        ({"dialogue": {"turns": [{"speaker": "A", "text": "x"}] * 3}}, {"max_turns": 2}, 422, "limit_exceeded", None),
        ({"dialogue": {"turns": []}}, {}, 422, "invalid_request", ["body", "dialogue", "turns"]),
    ],
)
def test_route_errors_are_counted_like_the_middleware_refusals(body, settings, status, reason, loc):
    with _client(**settings) as client:
        before = _rejected(client, reason)
        response = client.post("/predict", json=body)
        assert response.status_code == status
        if loc is not None:
            assert response.json()["detail"][0]["loc"] == loc
        assert _rejected(client, reason) == before + 1


def test_engine_exceptions_keep_their_answers():
    from service import engine

    cases = {
        engine.PromptTooLong(5000, 4088): (422, "prompt_too_long", ("body",), {}),
        engine.TooMuchWork("too much"): (422, "too_many_tokens", ("body",), {}),
        engine.Overloaded("busy"): (429, "overload_tokens", ("request",), {"Retry-After": "1"}),
        engine.EngineUnavailable("dead"): (503, "unavailable", ("request",), {"Retry-After": "5"}),
        engine.EngineFailed("died"): (500, "engine_failed", ("request",), {}),
    }
    for exc, (status, kind, loc, headers) in cases.items():
        error = as_service_error(exc)
        assert (error.status, error.type, error.loc, dict(error.headers), error.message) == (
            status,
            kind,
            loc,
            headers,
            str(exc),
        )
    with pytest.raises(TypeError, match="ValueError is not an error"):
        as_service_error(ValueError("not ours"))


def test_the_predictor_answers_in_its_own_types_and_resolves_the_label_set_once(monkeypatch):
    predictor = _predictor(Settings())
    calls: list[str | None] = []
    resolve = predictor.label_set

    def counted(requested):
        calls.append(requested)
        return resolve(requested)

    monkeypatch.setattr(predictor, "label_set", counted)
    dialogue = Dialogue("", (Turn("Ann", "Hi"), Turn("Bob", "Hello!")))
    answer = asyncio.run(predictor.predict(dialogue))
    assert isinstance(answer, Answer) and answer.target == 1 and answer.label_set == "meld"
    assert calls == [None]
    batch = asyncio.run(predictor.predict_dialogues([dialogue, dialogue], "meld"))
    assert isinstance(batch, DialoguesAnswer) and [len(p) for p in batch.predictions] == [2, 2]
    assert calls == [None, "meld"]


def test_the_predictor_reports_limits_at_the_field_of_the_request():
    predictor = _predictor(Settings(max_text_chars=3))
    dialogue = Dialogue("", (Turn("Ann", "Hi"), Turn("Bob", "Hello!")))
    with pytest.raises(LimitError) as caught:
        asyncio.run(predictor.predict_dialogues([dialogue, dialogue]))
    assert caught.value.loc == ("body", "dialogues", 0, "turns", 1, "text")
    assert "6 characters exceed the limit of 3 (ERC_MAX_TEXT_CHARS)" in caught.value.message
    with pytest.raises(LimitError, match="target 5 is outside the dialogue's turns 0..1"):
        asyncio.run(predictor.predict(Dialogue("", dialogue.turns[:1] * 2), target=5))
    with pytest.raises(LabelSetUnavailable, match="not trained on it"):
        predictor.label_set("emorynlp")
