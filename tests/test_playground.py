"""The playground at ``/``: served from the package (fast tests, engine double), and used in a
real browser (Debian's Chromium, headless, driven by Playwright) against a live service with
the real engine, started by the benchmark's launcher."""

from __future__ import annotations

import re
import shutil
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.labels import LABEL_SETS
from service.predictor import Predictor
from service.routes.playground import ASSETS, STATIC
from service.settings import Settings
from service.spec import Demonstrations, ServingSpec
from service.state import ServiceState
from tests.conftest import IN_CI, process_test_env, require
from tests.doubles import FakeEngine

MELD = LABEL_SETS["meld"]

#: Four turns, each "Speaker: text", as a person would paste them.
DIALOGUE = [
    ("Rachel", "Oh my God, you got the job? That's amazing!"),
    ("Ross", "I know! I start on Monday."),
    ("Rachel", "Wait, Monday? We're supposed to fly to London on Monday."),
    ("Ross", "Oh no. I completely forgot about London."),
]


def _text(turns) -> str:
    return "\n".join(f"{speaker}: {text}" for speaker, text in turns)


def _link(base: str, turns, label_set: str = "meld") -> str:
    return f"{base}/?label_set={label_set}&d={urllib.parse.quote(_text(turns))}"


def _api_turns(turns) -> list[dict]:
    return [{"speaker": s, "text": t} for s, t in turns]


# --- fast: the page as files, with the engine double ------------------------------------------


def _client(settings: Settings) -> TestClient:
    async def loader(s: Settings, state: ServiceState) -> None:
        state.engine = FakeEngine()
        spec = ServingSpec(demonstrations=Demonstrations(k=0), model_name="fake")
        state.predictor = Predictor(s, spec, state.engine, {})

    return TestClient(create_app(settings, loader=loader))


def test_the_page_and_its_files_are_served():
    with _client(Settings()) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        # The page loads only from its own origin (what the browser enforces, whatever the files say).
        assert "default-src 'none'" in page.headers["content-security-policy"]
        for needed in ('id="dialogue"', 'id="label-set"', 'id="label"', 'id="turns"', 'id="status"'):
            assert needed in page.text
        for name, media_type in ASSETS.items():
            asset = client.get(f"/playground/{name}")
            assert asset.status_code == 200, name
            assert asset.headers["content-type"].split(";")[0] == media_type.split(";")[0]
            assert asset.content == (STATIC / name).read_bytes()
        # Every file the page names is one the route serves.
        named = re.findall(r'(?:src|href)="(/playground/[^"]+)"', page.text)
        assert sorted(p.rsplit("/", 1)[1] for p in named) == sorted(ASSETS)
        for path in ("/playground/index.html", "/playground/missing.js"):
            missing = client.get(path)
            assert missing.status_code == 404, path
            assert missing.json()["detail"][0]["type"] == "not_found"
        # Only the named files: no path reaches the file system.
        escape = client.get("/playground/..%2Froutes%2Fplayground.py")
        assert escape.status_code == 404 and "APIRouter" not in escape.text


def test_the_page_fetches_nothing_from_another_host():
    files = sorted(STATIC.iterdir())
    assert {f.name for f in files} == {"index.html", *ASSETS}, "a file the route does not serve"
    # The SVG namespace is a name, never fetched.
    allowed = {"http://www.w3.org/2000/svg"}
    for f in files:
        text = f.read_text()
        urls = set(re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>)]*", text, re.I)) - allowed
        assert not urls, (f.name, urls)
        # Protocol-relative references (//host/...) in attributes, CSS url() or @import.
        assert not re.search(r"""(?:src|href|action)\s*=\s*["']?//|url\(\s*["']?//|@import""", text), f.name
    html = (STATIC / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert ref.startswith(("/", "#")), ref


def test_playground_off_answers_404_in_the_error_body(monkeypatch):
    monkeypatch.setenv("ERC_PLAYGROUND", "false")
    settings = Settings()
    assert settings.playground is False
    with _client(settings) as client:
        for path in ("/", "/playground/playground.js"):
            response = client.get(path)
            assert response.status_code == 404, path
            [error] = response.json()["detail"]
            assert set(error) == {"loc", "msg", "type"}
            assert "ERC_PLAYGROUND" in error["msg"]
        # Only the page is off: the API is still served.
        body = {"dialogue": {"turns": _api_turns(DIALOGUE)}}
        assert client.post("/predict", json=body).status_code == 200


# --- a real browser on the live service ---------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        message = "playwright is missing (pip install -e '.[dev]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    chromium = require(Path(shutil.which("chromium") or "/usr/bin/chromium"), "apt-get install chromium")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(chromium), headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(settings, tmp_path_factory):
    """``erc serve`` on a free port, returned as soon as it answers HTTP: the model may still be
    loading, which the first browser test sees."""
    from bench.launcher import ServerProcess, free_port

    require(settings.index_root / "meld" / "manifest.json", "run `erc index build --dataset meld`")
    log = tmp_path_factory.mktemp("playground") / "serve.log"
    # The page, not the model's numbers, is under test: the process tests' model, eager; float32,
    # whose scores the page must show as the API gives them (up to rounding, whatever the batch).
    env = {
        **process_test_env(settings),
        "ERC_ENFORCE_EAGER": "true",
        "ERC_DTYPE": "float32",
        "ERC_KV_CACHE_GIB": "1",
        "ERC_DRAIN_GRACE_S": "0",
    }
    launched = ServerProcess(free_port(), env=env, log=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert launched.proc.poll() is None, f"the server exited during start-up; see {log}"
            assert time.monotonic() < deadline, "the server did not answer HTTP within 120 s"
            try:
                httpx.get(f"{launched.base}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield launched
    finally:
        launched.stop()


# Records every text the status line shows, from before the page's first script runs: the
# document is observed (it exists before any element does) and the line read at each change.
STATUS_LOG = """
window.__statuses = [];
new MutationObserver(() => {
  const line = document.getElementById("status");
  const text = line && line.textContent;
  if (text && text !== window.__statuses[window.__statuses.length - 1]) window.__statuses.push(text);
}).observe(document, { childList: true, characterData: true, subtree: true });
"""

#: The browser waits this long for the model to load (a compile on an empty cache takes minutes).
LOAD_MS = 600_000


def _open(browser, url: str, width: int = 1280, height: int = 900):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    # The page's API calls and their outcome, for a failure's message.
    calls: list[str] = []
    page.on("request", lambda r: r.method == "POST" and calls.append(f"{r.method} {r.url.split('?')[0]}"))
    page.on("requestfinished", lambda r: r.method == "POST" and calls.append(f"finished {r.url}"))
    page.on("requestfailed", lambda r: calls.append(f"failed {r.url}: {r.failure}"))
    page.calls = calls
    page.add_init_script(STATUS_LOG)
    page.goto(url)
    return page


# Predicates are function expressions: the page's Content-Security-Policy forbids eval, which
# Playwright would use for a bare expression.
def _wait_labels(page, server, n: int, timeout: float = LOAD_MS) -> list:
    """The page's n labelled turns; fails at once if the server dies or its load fails."""
    from playwright.sync_api import TimeoutError as Timeout

    deadline = time.monotonic() + timeout / 1000
    while True:
        try:
            page.wait_for_function(
                f"() => document.querySelectorAll('#turns li.turn[data-label]').length === {n}", timeout=5_000
            )
            return page.locator("#turns li.turn").all()
        except Timeout:
            assert server.proc.poll() is None, f"the server exited; see {server.log_path}"
            health = httpx.get(f"{server.base}/health", timeout=10)
            assert health.status_code == 200, f"{health.text}; see {server.log_path}"
            status = page.locator("#status").inner_text()
            assert time.monotonic() < deadline, f"no labels after {timeout / 1000:g} s: {status}"


def _shown(page, selector: str, timeout: float = 120_000) -> None:
    """Wait for ``selector``; on a timeout, say what the page's status line went through."""
    from playwright.sync_api import TimeoutError as Timeout

    try:
        page.wait_for_selector(selector, timeout=timeout)
    except Timeout:
        statuses = page.evaluate("window.__statuses")[-5:]
        opened = page.evaluate("[...document.querySelectorAll('[aria-expanded=true]')].map(e => e.textContent)")
        pytest.fail(
            f"{selector} not shown after {timeout / 1000:g} s; statuses: {statuses}; "
            f"calls: {page.calls}; expanded: {opened}"
        )


def test_a_link_labels_its_dialogue_as_the_api_does(server, browser, tmp_path):
    """Open a link while the model loads: the page says so, retries, then labels every turn as
    /predict_dialogue does; a turn opens what /predict debug used for it."""
    page = _open(browser, _link(server.base, DIALOGUE))
    # The first status after the page's own "Asking the service..." is its answer from /ready.
    page.wait_for_function("() => window.__statuses.length > 1", timeout=30_000)
    first = page.evaluate("window.__statuses[1]")
    if httpx.get(f"{server.base}/ready", timeout=10).status_code != 200:
        # The page asked /ready before this did, so it was told the model is loading.
        assert "loading" in first, first
    items = _wait_labels(page, server, len(DIALOGUE))

    body = {"dialogues": [{"turns": _api_turns(DIALOGUE)}], "label_set": "meld"}
    answer = httpx.post(f"{server.base}/predict_dialogue", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    want = answer.json()["results"][0]["predictions"]
    assert [i.get_attribute("data-label") for i in items] == [p["label"] for p in want]
    for item, p in zip(items, want):
        # float32 scores agree up to rounding, not bit for bit: the second request reuses the
        # first one's prefix cache, so its prompt is computed in other chunks.
        assert float(item.get_attribute("data-score")) == pytest.approx(p["scores"][p["label"]], abs=1e-5)
        # The label is written, not only coloured, and every bar has a name and a value for a reader.
        assert p["label"] in item.locator(".chip").inner_text()
        meters = item.locator("[role=meter]").all()
        assert [m.get_attribute("aria-label") for m in meters] == list(MELD)
        for m in meters:
            assert re.fullmatch(r"\d+\.\d%", m.get_attribute("aria-valuetext"))
    assert answer.json()["model"] in page.locator("#meta").inner_text()
    assert re.search(r"in \d+ ms", page.locator("#meta").inner_text())
    # The address reproduces the view.
    query = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)
    assert query == {"label_set": ["meld"], "d": [_text(DIALOGUE)]}
    page.screenshot(path=str(tmp_path / "playground-1280.png"), full_page=True)

    # What the service used for turn 3: the demonstrations and the prompt of /predict debug.
    head = items[2].locator("button.turn-head")
    head.click()
    _shown(page, "#details-2 pre.prompt")
    assert head.get_attribute("aria-expanded") == "true"
    debug = httpx.post(
        f"{server.base}/predict",
        json={"dialogue": {"turns": _api_turns(DIALOGUE)}, "target": 2, "label_set": "meld", "debug": True},
        timeout=120,
    ).json()
    assert debug["demonstrations"], "the served model retrieves demonstrations"
    shown = page.locator("#details-2 li.demo").all()
    assert len(shown) == len(debug["demonstrations"])
    for li, demo in zip(shown, debug["demonstrations"]):
        assert demo["text"] in li.inner_text()
        assert li.get_attribute("data-label") == demo["label"]
    assert page.locator("#details-2 pre.prompt").inner_text() == debug["prompt"]
    page.screenshot(path=str(tmp_path / "playground-details-1280.png"), full_page=True)
    assert not page.errors
    print(f"\n[playground] screenshots in {tmp_path}")
    page.close()


def test_at_a_phone_width_and_by_keyboard(server, browser, tmp_path):
    page = _open(browser, _link(server.base, DIALOGUE), width=375, height=812)
    _wait_labels(page, server, len(DIALOGUE))
    # Nothing wider than the phone: no sideways scrolling.
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(tmp_path / "playground-375.png"), full_page=True)

    # Tab reaches the dialogue, the label set, the button and every turn, in that order.
    page.locator("body").focus()
    order = []
    for _ in range(12):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
    for before, after in [("dialogue", "label-set"), ("label-set", "label"), ("label", "turn-head")]:
        assert order.index(before) < order.index(after), order
    assert order.count("turn-head") == len(DIALOGUE), order
    for _ in range(12):
        if page.evaluate("document.activeElement.className") == "turn-head":
            break
        page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")
    _shown(page, ".details pre.prompt")
    assert not page.errors
    page.close()


def test_bad_input_shows_the_api_message_next_to_its_field(server, browser):
    page = _open(browser, f"{server.base}/")
    page.wait_for_function("() => !document.getElementById('label').disabled", timeout=LOAD_MS)
    bad = [("Ross", "Hi."), ("Joey", ""), ("Ross", "Bye.")]
    answer = httpx.post(f"{server.base}/predict_dialogue", json={"dialogues": [{"turns": _api_turns(bad)}]}, timeout=60)
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["loc"][-2:] == [1, "text"]
    page.locator("#dialogue").fill(_text(bad))
    page.locator("#dialogue").press("Control+Enter")
    _shown(page, "#dialogue-error li")
    shown = page.locator("#dialogue-error").inner_text()
    assert error["msg"] in shown and "Line 2" in shown, shown
    assert page.locator("#dialogue").get_attribute("aria-invalid") == "true"
    assert page.locator("#label-set-error").inner_text() == ""

    # A label set the API does not know: its message goes next to the label-set field.
    page = _open(browser, _link(server.base, DIALOGUE, label_set="klingon"))
    _shown(page, "#label-set-error li")
    answer = httpx.post(
        f"{server.base}/predict_dialogue",
        json={"dialogues": [{"turns": _api_turns(DIALOGUE)}], "label_set": "klingon"},
        timeout=60,
    )
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["msg"] in page.locator("#label-set-error").inner_text()
    assert page.locator("#label-set").get_attribute("aria-invalid") == "true"
    assert page.locator("#dialogue-error").inner_text() == ""
    assert not page.errors
    page.close()


def test_busy_waits_for_retry_after_and_a_401_asks_for_a_key(server, browser):
    """429 (or 503): the page says it is busy and retries after Retry-After; 401: a key field
    appears and the key goes out as a bearer token. The refusals are injected into the browser's
    traffic (the server here has no keys and no load); the labels come from the live service."""
    calls: list[tuple[float, str | None]] = []

    def refuse_twice(route, request):
        calls.append((time.monotonic(), request.headers.get("authorization")))
        if len(calls) == 1:
            error = {"loc": ["request"], "msg": "too many requests in flight", "type": "overload"}
            route.fulfill(status=429, headers={"Retry-After": "2"}, json={"detail": [error]})
        elif len(calls) == 2:
            error = {"loc": ["header", "authorization"], "msg": "missing or wrong API key", "type": "unauthorized"}
            route.fulfill(status=401, headers={"WWW-Authenticate": "Bearer"}, json={"detail": [error]})
        else:
            route.continue_()

    page = _open(browser, "about:blank")
    page.route("**/predict_dialogue", refuse_twice)
    page.goto(_link(server.base, DIALOGUE))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('busy')", timeout=LOAD_MS)
    assert re.search(r"busy.*retrying in [12] s", page.locator("#status").inner_text())
    _shown(page, "#key-field:not([hidden])", 30_000)
    assert calls[1][0] - calls[0][0] >= 1.9, "retried before Retry-After"
    assert "missing or wrong API key" in page.locator("#api-key-error").inner_text()
    key = "k" * 24
    page.locator("#api-key").fill(key)
    page.locator("#label").click()
    _wait_labels(page, server, len(DIALOGUE), timeout=120_000)
    assert calls[2][1] == f"Bearer {key}"
    assert page.evaluate("sessionStorage.getItem('erc-api-key')") == key
    assert key not in page.url
    assert not page.errors
    page.close()
