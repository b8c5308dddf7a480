"""The CPU image, built and run on this machine: `deploy/image.sh` (what `make image` runs) builds
erc:cpu, then `deploy/compose.yaml` brings up two replicas and the nginx balancer (the compose
file users run, unchanged but for the index folder and the published port), beside one bare
`erc serve` process on the same index. The replicas must get ready, report healthy, answer the
same labels as the bare process (bar bfloat16's near-ties), run every process as the service user under tini with the
hardening and limits compose.yaml asks for, and a `docker stop` of one of them under load
through the balancer must lose no request; a replica whose server dies is restarted.

The plain `docker run` of the docs is tested in tests/test_container_run.py: a module of its own,
so that its engine never starts while this module's three are up (four engines do not fit the
memory of a 24 GiB machine). Daemon, image and helpers: tests/containers.py."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.launcher import ServerProcess, free_port
from tests.conftest import require
from tests.containers import (
    DEPLOY,
    IMAGE,
    LABEL,
    READY_TIMEOUT_S,
    ROOT,
    Container,
    _compose_command,
    _docker,
    _index_root,
    _run,
)
from tests.test_deploy import LOAD_REQUESTS, LOAD_SIGNAL_AT, _payloads, _retried, access_lines, run_load

# On by default, CI included (the issue asks for it): a cold image build and a replica compiling
# its model make this the slowest module of the suite (deploy/README.md has the measured times).
# ERC_CONTAINER_TESTS=0 skips it on a machine where the image is not wanted.
pytestmark = pytest.mark.skipif(
    os.environ.get("ERC_CONTAINER_TESTS", "1") == "0", reason="ERC_CONTAINER_TESTS=0: the image is not built"
)

# The bare process drains and caches as test_deploy's replicas do.
BARE_ENV = {"ERC_DRAIN_GRACE_S": "1", "ERC_KV_CACHE_GIB": "1"}


class Compose:
    """deploy/compose.yaml as a project of its own (name, index folder and published port set)."""

    def __init__(self, env: dict, index_root: Path) -> None:
        self.project = f"erctest{os.getpid()}"
        self.port = free_port()
        self.env = {
            **env,
            "ERC_INDEX_DIR": str(index_root),
            "ERC_LB_PORT": str(self.port),
            # Three engines share two cores and the machine's memory.
            "ERC_KV_CACHE_GIB": "1",
        }
        for name in ("ERC_MEM_LIMIT", "ERC_TARGET", "ERC_REPLICAS"):  # compose.yaml's defaults are under test
            self.env.pop(name, None)
        self.cmd = [*_compose_command(env), "-f", str(DEPLOY / "compose.yaml"), "-p", self.project]

    def __call__(self, *args: str, timeout: float = 300) -> str:
        return _run([*self.cmd, *args], self.env, timeout, f"compose {' '.join(args)}").stdout.strip()

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).split()
        assert len(ids) == 1, f"service {service}: containers {ids}"
        return ids[0]

    def ip(self, service: str) -> str:
        networks = json.loads(_docker(self.env, "inspect", self.container(service)))[0]["NetworkSettings"]["Networks"]
        return next(iter(networks.values()))["IPAddress"]


@pytest.fixture(scope="module")
def deployment(docker_env, settings, data_dir, tmp_path_factory):
    index_root = _index_root(settings)
    require(settings.weights_root / "base" / "erc.json", "run `erc weights build`")
    tmp = tmp_path_factory.mktemp("container")
    compose = Compose(docker_env, index_root)
    compose("build", "nginx", timeout=600)
    bare = None
    try:
        # The bare process starts first, reloading the host's compile cache (the rest of the suite
        # compiled the same model): its mostly single-threaded start uses the core that erc's
        # compile leaves idle. `up` returns once erc is healthy (/ready): erc-2 waits for it
        # (compose.yaml's rolling first start), then reloads the compile cache erc wrote into the
        # shared volume.
        bare = ServerProcess(free_port(), env=BARE_ENV, log=tmp / "bare.log")
        compose("up", "-d", "--no-build", timeout=READY_TIMEOUT_S)
        replicas = [
            Container(docker_env, compose.container(s), f"http://{compose.ip(s + '-net')}:8000")
            for s in ("erc", "erc-2")
        ]
        for c in replicas:
            c.wait_ready()
        bare_ready = bare.wait_ready(READY_TIMEOUT_S)
        # The replicas' logs of their first start: a later test may restart one, and `docker
        # logs` then holds every start's lines.
        first_start_logs = {"a": replicas[0].logs(), "b": replicas[1].logs()}
        print(
            f"\n[container] start -> /ready: erc {replicas[0].ready_after:.0f} s (empty compile cache), "
            f"erc-2 {replicas[1].ready_after:.0f} s (the cache erc wrote); "
            f"the bare process {bare_ready:.0f} s (the host's cache, beside erc's compile)"
        )
        yield {
            "env": docker_env,
            "compose": compose,
            "bare": bare,
            "a": replicas[0],
            "b": replicas[1],
            "nginx": Container(docker_env, compose.container("nginx"), f"http://127.0.0.1:{compose.port}"),
            "tmp": tmp,
            "payloads": _payloads(data_dir),
            "first_start_logs": first_start_logs,
        }
    finally:
        if bare is not None:
            bare.stop()
        # -v: the project's compile-cache volume too.
        subprocess.run([*compose.cmd, "down", "-v", "-t", "10"], env=compose.env, capture_output=True, timeout=300)


def test_runtime_image_is_slim_and_read_only(docker_env):
    config = json.loads(_docker(docker_env, "image", "inspect", IMAGE))[0]["Config"]
    assert config["User"] == "10001"
    assert config["Entrypoint"][0] == "tini", config["Entrypoint"]
    assert "Healthcheck" in config and "/ready" in " ".join(config["Healthcheck"]["Test"])
    probe = (
        "import importlib.util, json, os;"
        "print(json.dumps({'uid': os.getuid(),"
        " 'train_extras': [m for m in ('peft', 'gguf', 'matplotlib', 'onnx') if importlib.util.find_spec(m)],"
        " 'encoder_runtime': bool(importlib.util.find_spec('onnxruntime')),"
        " 'writable': [p for p in ('/app', '/app/weights', '/opt/venv', '/usr/local/bin') if os.access(p, os.W_OK)],"
        " 'weights': sorted(os.listdir('/app/weights'))}))"
    )
    out = _docker(
        docker_env,
        "run",
        "--rm",
        "--label",
        LABEL,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--entrypoint",
        "python",
        IMAGE,
        "-c",
        probe,
    )
    facts = json.loads(out.splitlines()[-1])
    assert facts["uid"] == 10001
    assert facts["train_extras"] == [], "training extras leaked into the runtime image"
    assert facts["encoder_runtime"], "the default encoder backend's runtime (onnxruntime) is missing"
    assert "encoder-onnx" in facts["weights"], facts["weights"]
    assert facts["writable"] == [], "code or weights writable by the service user"
    # One merged model, the default: what it was built from (GGUF, converted base) is dropped.
    default = (ROOT / "weights" / "adapters" / "DEFAULT").read_text().strip()
    assert default in facts["weights"] and "adapters" in facts["weights"], facts["weights"]
    assert not {"base", "gguf"} & set(facts["weights"]), facts["weights"]


def serving(deployment, *names: str) -> None:
    """The named replicas ("a", "b") running and ready: one that an earlier test left stopped is
    started again here, by the test that needs it, so no test depends on which ran before it and
    none restarts a replica that no later test uses."""
    for name in names:
        c = deployment[name]
        if not c.inspect()["State"]["Running"]:
            _docker(deployment["env"], "start", c.id, what="docker start")
        c.wait_ready()


def test_compose_runs_hardened_limited_replicas_behind_nginx(deployment):
    """What compose.yaml asks for reaches the containers (compose 1.29 and v2 alike), and the
    balancer sends work to both replicas."""
    serving(deployment, "a", "b")
    compose = deployment["compose"]
    for c in (deployment["a"], deployment["b"]):
        host = c.inspect()["HostConfig"]
        assert host["RestartPolicy"]["Name"] == "unless-stopped", host["RestartPolicy"]
        assert host["Memory"] == 8 * 2**30, host["Memory"]  # mem_limit 8g (ERC_MEM_LIMIT)
        assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"], host
        assert "no-new-privileges:true" in host["SecurityOpt"], host["SecurityOpt"]
        assert host["NetworkMode"].startswith("container:"), host["NetworkMode"]
    assert deployment["a"].base != deployment["b"].base
    nginx = deployment["nginx"]
    assert httpx.get(f"{nginx.base}/ready", timeout=5).status_code == 200
    since = len(nginx.logs(stderr=False).splitlines())  # the access log is nginx's stdout
    with httpx.Client(base_url=nginx.base, timeout=300) as client:
        for path, body in [p for p in deployment["payloads"] if p[0] == "/predict"][:4]:
            assert client.post(path, json=body).status_code == 200
    lines = access_lines(lambda: nginx.logs(stderr=False), since, "POST /predict", 4)
    # The replica that answered: the last one tried ("a, b": retried on b, e.g. over a keepalive
    # connection to a replica another test restarted).
    served = {line.split("upstream=")[1].split(" upstream_status=")[0].split(", ")[-1] for line in lines}
    addresses = {c.base.removeprefix("http://") for c in (deployment["a"], deployment["b"])}
    assert len(lines) == 4 and served == addresses, (lines, addresses)
    assert compose("ps", "-q").count("\n") + 1 == 5  # two replicas, their two network holders, nginx


def _predict_all(base: str, payloads: list[tuple[str, dict]]) -> list[dict[str, float]]:
    """Each classified utterance's scores, in the order of the payloads."""
    scores = []
    with httpx.Client(base_url=base, timeout=300) as client:
        for path, body in payloads:
            response = client.post(path, json=body)
            assert response.status_code == 200, f"{base}{path}: {response.status_code} {response.text[:300]}"
            data = response.json()
            if path == "/predict":
                scores.append(data["scores"])
            else:
                scores.extend(p["scores"] for r in data["results"] for p in r["predictions"])
    return scores


def test_container_answers_the_same_labels_as_the_bare_process(deployment):
    """Same labels, bar near-ties, and the same probabilities within the card test's bounds.
    bfloat16 (what ERC_DTYPE=auto serves on a CPU with BF16 instructions) is not batch-invariant:
    the two processes batch a dialogue's utterances by their own timing, so a near-tie may flip;
    a label led by CLEAR_MARGIN may not, and another model, template or calibration moves every
    lead at once, past MARGIN_SHIFT_BOUND."""
    from training.card import CLEAR_MARGIN, MARGIN_SHIFT_BOUND, compare_labels, leads

    serving(deployment, "a")
    payloads = [p for p in deployment["payloads"] if p[0] == "/predict"][:6] + [
        p for p in deployment["payloads"] if p[0] == "/predict_dialogue"
    ][:2]
    bare = _predict_all(deployment["bare"].base, payloads)
    contained = _predict_all(deployment["a"].base, payloads)
    assert len(bare) == len(contained) >= 10
    assert all(a.keys() == b.keys() for a, b in zip(bare, contained))
    labels = list(bare[0])
    c = compare_labels(*(leads([[s[k] for k in labels] for s in run], labels) for run in (bare, contained)))
    same, shift = len(bare) - c["changed"], c["margin_shift"]
    print(f"\n[container] {same}/{len(bare)} labels equal to the bare process's, leads moved {shift:.4f} on average")
    assert not c["clear_flips"], f"labels led by >= CLEAR_MARGIN {CLEAR_MARGIN} changed: {c['clear_flips']}"
    assert shift <= MARGIN_SHIFT_BOUND, f"leads moved {shift:.4f} on average, over {MARGIN_SHIFT_BOUND}"


def test_container_runs_unprivileged_under_tini(deployment):
    serving(deployment, "a")
    c = deployment["a"]
    script = (
        "for d in /proc/[0-9]*; do "
        "printf '%s %s %s\\n' \"$(cat $d/comm)\" \"$(awk '/^Uid:/{print $2}' $d/status)\" "
        "\"$(awk '/^CapEff:/{print $2}' $d/status)\"; "
        "done"
    )
    procs = [line.split() for line in c.exec("sh", "-c", script).splitlines() if line.strip()]
    assert c.exec("cat", "/proc/1/comm") == "tini"
    assert len(procs) >= 3, procs  # tini, the server, vLLM's engine process (+ this shell)
    assert all(uid == "10001" for _, uid, _ in procs), procs
    assert all(int(cap, 16) == 0 for _, _, cap in procs), procs


def test_healthcheck_reports_healthy(deployment):
    serving(deployment, "a")
    c = deployment["a"]
    deadline = time.monotonic() + 90  # the check runs every 10 s
    status = None
    while time.monotonic() < deadline:
        status = c.inspect()["State"]["Health"]["Status"]
        if status == "healthy":
            return
        time.sleep(2)
    log = c.inspect()["State"]["Health"].get("Log", [])[-3:]
    raise AssertionError(f"HEALTHCHECK status {status!r} 90 s after /ready; last checks: {log}")


def test_docker_stop_under_load_loses_no_request(deployment):
    """`docker stop` of one replica while 4 clients send LOAD_REQUESTS through compose's nginx: the
    replica drains (503 for new work, which nginx retries on the other; in-flight work finishes),
    exits by itself, and stays stopped (unless-stopped); no request fails."""
    serving(deployment, "a", "b")
    survivor, victim, nginx = deployment["a"], deployment["b"], deployment["nginx"]
    since = len(nginx.logs(stderr=False).splitlines())
    fired = threading.Event()
    stopper: list[threading.Thread] = []

    def progress(sent: int) -> None:
        if sent >= LOAD_SIGNAL_AT and not fired.is_set():
            fired.set()
            t = threading.Thread(
                target=subprocess.run,
                args=(["docker", "stop", "-t", "90", victim.id],),
                kwargs={"env": deployment["env"], "capture_output": True, "timeout": 150},
            )
            t.start()
            stopper.append(t)

    stats = run_load(nginx.base, deployment["payloads"], total=LOAD_REQUESTS, workers=4, on_progress=progress)
    for t in stopper:
        t.join(timeout=160)
    access = deployment["tmp"] / "nginx-access.log"
    access.write_text(nginx.logs(stderr=False))
    retried = _retried(access, since)
    print(
        f"\n[docker stop] sent {stats['sent']}, succeeded {stats['succeeded']}, retried by nginx {retried}, "
        f"failed {stats['failed']}"
    )
    assert fired.is_set()
    assert stats["failed"] == 0, stats["errors"]
    assert stats["succeeded"] == stats["sent"] == LOAD_REQUESTS
    state = victim.inspect()["State"]
    logs = victim.logs()
    assert not state["Running"], "docker stop returned but the container still runs"
    assert "drained in" in logs, logs[-3000:]
    # Stopped by the drain, not by docker's SIGKILL after the timeout (137) or the OOM killer.
    assert state["ExitCode"] in (0, 143) and not state["OOMKilled"], (state, logs[-2000:])
    time.sleep(3)
    assert not victim.inspect()["State"]["Running"], "a stopped replica was restarted (unless-stopped)"
    assert httpx.get(f"{survivor.base}/ready", timeout=5).status_code == 200


# vLLM's line when it reloads the compiled model instead of compiling it (vllm/compilation/decorators.py).
CACHE_LOADED = "Directly load AOT compilation from path /cache/"


def test_replicas_share_the_compile_cache(deployment):
    """compose.yaml's compile-cache volume: erc compiled the model into the empty volume, erc-2
    (started after erc was healthy) reloaded it."""
    first = deployment["first_start_logs"]
    assert CACHE_LOADED not in first["a"], "erc found a compiled model in a fresh volume"
    assert CACHE_LOADED in first["b"], deployment["b"].diagnosis()


def test_a_replica_whose_server_dies_is_restarted(deployment):
    """restart: unless-stopped: the server process killed (not stopped by docker) brings the
    container back, in the same network namespace, and it reloads the compiled model from the
    cache volume instead of compiling it again."""
    serving(deployment, "a")
    c = deployment["a"]
    loaded = c.logs().count(CACHE_LOADED)
    before = c.inspect()
    c.exec("sh", "-c", "kill -KILL $(cat /proc/1/task/1/children)")
    deadline = time.monotonic() + 60
    state = before["State"]
    while time.monotonic() < deadline:
        after = c.inspect()
        state = after["State"]
        if after["RestartCount"] > before["RestartCount"] and state["Running"]:
            break
        time.sleep(1)
    else:
        raise AssertionError(f"not restarted within 60 s: {state}")
    assert after["HostConfig"]["NetworkMode"] == before["HostConfig"]["NetworkMode"]
    ready = c.wait_ready()
    print(f"\n[container] restarted replica: start -> /ready {ready:.0f} s (compile cache kept)")
    assert c.logs().count(CACHE_LOADED) > loaded, c.diagnosis()
