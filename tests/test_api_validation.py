"""HTTP validation with an engine test double: every bad input gets a 4xx naming field and limit."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.state import ServiceState
from service.predictor import Predictor
from service.settings import Settings
from service.spec import Calibration, Demonstrations, ServingSpec
from tests.doubles import FakeEngine

LIMITS = dict(max_turns=5, max_text_chars=50, max_speaker_chars=10, max_dialogues=2, max_batch_turns=6)


def _dialogue(n: int = 2, text: str = "Hello there") -> dict:
    return {"id": "d", "turns": [{"speaker": f"S{i % 2}", "text": f"{text} {i}"} for i in range(n)]}


@pytest.fixture
def client():
    settings = Settings(**LIMITS)
    engine = FakeEngine()

    async def loader(s: Settings, state: ServiceState) -> None:
        state.engine = engine
        state.predictor = Predictor(s, ServingSpec(demonstrations=Demonstrations(k=0), model_name="fake"), engine, {})

    with TestClient(create_app(settings, loader=loader)) as c:
        for _ in range(100):
            if c.get("/ready").status_code == 200:
                break
        c.engine = engine
        yield c


def _error(response, status: int = 422) -> tuple[list, str]:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    return detail[0]["loc"], detail[0]["msg"]


def test_valid_request_gets_label_and_scores(client):
    body = client.post("/predict", json={"dialogue": _dialogue(3)}).json()
    assert body["target"] == 2 and body["label"] in body["scores"]
    assert sum(body["scores"].values()) == pytest.approx(1.0)
    assert max(body["scores"], key=body["scores"].get) == body["label"]
    assert "prompt" not in body


@pytest.mark.parametrize(
    ("payload", "loc", "words"),
    [
        ({"dialogue": {"turns": []}}, ["body", "dialogue", "turns"], "at least 1"),
        (
            {"dialogue": {"turns": [{"speaker": "a", "text": ""}]}},
            ["body", "dialogue", "turns", 0, "text"],
            "at least 1",
        ),
        (
            {"dialogue": {"turns": [{"speaker": "a", "text": "  \n"}]}},
            ["body", "dialogue", "turns", 0, "text"],
            "empty",
        ),
        ({"dialogue": {"turns": [{"speaker": "a", "text": 5}]}}, ["body", "dialogue", "turns", 0, "text"], "string"),
        ({"dialogue": {"turns": [{"speaker": "a"}]}}, ["body", "dialogue", "turns", 0, "text"], "required"),
        ({"dialogue": _dialogue(), "target": "1"}, ["body", "target"], "integer"),
        (
            {"dialogue": _dialogue(), "label_set": "nope"},
            ["body", "label_set"],
            "unknown label set; known: meld, iemocap, emorynlp",
        ),
        ({"dialogue": _dialogue(), "extra": 1}, ["body", "extra"], "not permitted"),
        ({"dialogue": _dialogue(6)}, ["body", "dialogue", "turns"], "6 turns exceed the limit of 5 (ERC_MAX_TURNS)"),
        (
            {"dialogue": _dialogue(1, "x" * 60)},
            ["body", "dialogue", "turns", 0, "text"],
            "exceed the limit of 50 (ERC_MAX_TEXT_CHARS)",
        ),
        (
            {"dialogue": {"turns": [{"speaker": "s" * 11, "text": "hi"}]}},
            ["body", "dialogue", "turns", 0, "speaker"],
            "limit of 10",
        ),
        ({"dialogue": _dialogue(2), "target": 2}, ["body", "target"], "target 2 is outside the dialogue's turns 0..1"),
        ({"dialogue": _dialogue(2), "target": -1}, ["body", "target"], "outside"),
    ],
)
def test_predict_bad_input(client, payload, loc, words):
    got_loc, message = _error(client.post("/predict", json=payload))
    assert got_loc == loc and words in message


@pytest.mark.parametrize(
    ("payload", "loc", "words"),
    [
        ({"dialogues": []}, ["body", "dialogues"], "at least 1"),
        (
            {"dialogues": [_dialogue(1)] * 3},
            ["body", "dialogues"],
            "3 dialogues exceed the limit of 2 (ERC_MAX_DIALOGUES)",
        ),
        (
            {"dialogues": [_dialogue(4), _dialogue(4)]},
            ["body", "dialogues"],
            "8 turns in all exceed the limit of 6 (ERC_MAX_BATCH_TURNS)",
        ),
        (
            {"dialogues": [_dialogue(1), _dialogue(1, "y" * 51)]},
            ["body", "dialogues", 1, "turns", 0, "text"],
            "ERC_MAX_TEXT_CHARS",
        ),
        ({"dialogues": "x"}, ["body", "dialogues"], "list"),
    ],
)
def test_predict_dialogue_bad_input(client, payload, loc, words):
    got_loc, message = _error(client.post("/predict_dialogue", json=payload))
    assert got_loc == loc and words in message


def test_malformed_json_is_a_422_naming_the_problem(client):
    response = client.post("/predict", content=b'{"dialogue": ', headers={"content-type": "application/json"})
    loc, message = _error(response)
    assert "JSON" in message


def test_nothing_reaches_the_engine_on_bad_input(client):
    client.post("/predict", json={"dialogue": _dialogue(9)})
    assert client.engine.calls == []


def test_predict_dialogue_keeps_input_order_and_one_engine_batch(client):
    body = client.post(
        "/predict_dialogue", json={"dialogues": [_dialogue(2), {"id": "z", "turns": [{"speaker": "q", "text": "ok"}]}]}
    ).json()
    assert [r["id"] for r in body["results"]] == ["d", "z"]
    assert [len(r["predictions"]) for r in body["results"]] == [2, 1]
    assert len(client.engine.calls) == 1 and len(client.engine.calls[0]) == 3


def test_ready_is_503_until_loaded_and_predict_waits_for_it():
    gate = asyncio.Event()

    async def loader(s: Settings, state: ServiceState) -> None:
        await gate.wait()

    with TestClient(create_app(Settings(), loader=loader)) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").json()["status"] == "loading"
        response = c.post("/predict", json={"dialogue": _dialogue()})
        assert response.status_code == 503 and "loading" in response.json()["detail"][0]["msg"]
        assert response.headers["retry-after"]


def test_failed_load_turns_health_503_with_the_reason():
    async def loader(s: Settings, state: ServiceState) -> None:
        raise FileNotFoundError("/secret/path/weights has no erc.json")

    with TestClient(create_app(Settings(), loader=loader)) as c:
        for _ in range(100):
            if c.get("/health").status_code == 503:
                break
        body = c.get("/health").json()
        assert body["status"] == "failed" and "the service log says why" in body["detail"]
        assert c.get("/ready").status_code == 503
        for response in (c.get("/health"), c.get("/ready"), c.post("/predict", json={"dialogue": _dialogue()})):
            assert "/secret/path" not in response.text and "FileNotFoundError" not in response.text


def test_openapi_documents_both_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/predict_dialogue", "/health", "/ready"} <= set(paths)
    assert client.get("/docs").status_code == 200


@pytest.fixture
def two_set_client(tmp_path):
    """A model trained on MELD (no demonstrations, calibrated) and IEMOCAP (demonstrations from
    an index that was never built); EmoryNLP not trained."""
    from service.spec import Calibration, LabelSetSpec

    settings = Settings(index_root=tmp_path / "index", **LIMITS)
    engine = FakeEngine()
    push_fear = Calibration(bias=[0, 0, 9, 0, 0, 0, 0], temperature=2.0, fitted_on="test")
    spec = ServingSpec(
        label_sets={
            "meld": LabelSetSpec(demonstrations=Demonstrations(k=0), calibration=push_fear),
            "iemocap": LabelSetSpec(demonstrations=Demonstrations(k=3, index="iemocap")),
        },
        model_name="two-sets",
    )

    async def loader(s: Settings, state: ServiceState) -> None:
        state.engine = engine
        state.predictor = Predictor(s, spec, engine, {})

    with TestClient(create_app(settings, loader=loader)) as c:
        for _ in range(100):
            if c.get("/ready").status_code == 200:
                break
        yield c


def test_ready_lists_the_label_sets_served(two_set_client):
    assert two_set_client.get("/ready").json() == {"status": "ready", "detail": None, "label_sets": ["meld"]}


@pytest.mark.parametrize(
    ("label_set", "words"),
    [
        ("emorynlp", ["'emorynlp' cannot be served", "not trained on it", "serves: meld, iemocap"]),
        ("iemocap", ["'iemocap' cannot be served", "index", "is missing", "erc index build --dataset iemocap"]),
    ],
)
def test_a_label_set_that_cannot_be_served_is_a_clear_422(two_set_client, label_set, words):
    for path, body in (("/predict", {"dialogue": _dialogue(2)}), ("/predict_dialogue", {"dialogues": [_dialogue(2)]})):
        loc, msg = _error(two_set_client.post(path, json={**body, "label_set": label_set}))
        assert loc == ["body", "label_set"]
        assert all(w in msg for w in words), msg
        assert (
            two_set_client.post(path, json={**body, "label_set": label_set}).json()["detail"][0]["type"]
            == "label_set_unavailable"
        )


def test_served_scores_are_the_calibrated_distribution(two_set_client):
    from service.calibration import apply

    body = two_set_client.post("/predict", json={"dialogue": _dialogue(3), "debug": True}).json()
    # The double's distribution of this very prompt, calibrated as erc.json says.
    [raw] = asyncio.run(FakeEngine().classify([body["prompt"]], list(body["scores"])))
    expected = apply(raw, Calibration(bias=[0, 0, 9, 0, 0, 0, 0], temperature=2.0))
    assert list(body["scores"].values()) == pytest.approx(expected)
    assert body["label"] == "fear"  # the bias of 9 moves every decision to fear
