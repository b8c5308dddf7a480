"""The CPU image, built and run on this machine: `deploy/image.sh` (what `make image` runs) builds
erc:cpu, then `deploy/compose.yaml` brings up two replicas and the nginx balancer (the compose
file users run, unchanged but for the index folder and the published port), beside one bare
`erc serve` process on the same index. The replicas must get ready, report healthy, answer the
same labels as the bare process, run every process as the service user under tini with the
hardening and limits compose.yaml asks for, and a `docker stop` of one of them under load
through the balancer must lose no request; a replica whose server dies is restarted.

Needs root (it may install docker.io and docker-compose and start a Docker daemon of its own,
which it stops again) and the built index; skipped without them on a developer machine, failed
under CI."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.launcher import ServerProcess, free_port
from service.startup import EXIT_CONFIG
from tests.conftest import IN_CI, require
from tests.test_deploy import _payloads, _retried, access_lines, run_load

# On by default, CI included (the issue asks for it): a cold image build and a replica compiling
# its model make this the slowest module of the suite (deploy/README.md has the measured times).
# ERC_CONTAINER_TESTS=0 skips it on a machine where the image is not wanted.
pytestmark = pytest.mark.skipif(
    os.environ.get("ERC_CONTAINER_TESTS", "1") == "0", reason="ERC_CONTAINER_TESTS=0: the image is not built"
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
IMAGE = os.environ.get("ERC_TEST_IMAGE", "erc:cpu")
LABEL = "erc-test-container=1"
PROJECT_FORMAT = '{{.ID}} {{.Label "com.docker.compose.project"}}'
# A cold build here (no layer cache) downloads about 1.5 GB of wheels and converts the weights.
BUILD_TIMEOUT_S = 1800
# Three engines compile at once on two cores; other work on the machine slows it a lot (586 s
# measured beside a heavy job, 126 s alone): deploy/README.md.
READY_TIMEOUT_S = 900
# The bare process drains and caches as test_deploy's replicas do.
BARE_ENV = {"ERC_DRAIN_GRACE_S": "1", "ERC_KV_CACHE_GIB": "1"}


def _skip_or_fail(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _run(cmd: list[str], env: dict, timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"")[-3000:] if isinstance(exc.stdout, bytes) else (exc.stdout or "")[-3000:]
        raise AssertionError(f"{what}: no result after {timeout} s: {' '.join(cmd)}\n{out}") from None
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _docker(env: dict, *args: str, timeout: float = 120, what: str = "docker") -> str:
    return _run(["docker", *args], env, timeout, what).stdout.strip()


@pytest.fixture(scope="module")
def docker_env():
    """A Docker daemon (the one already answering, else our own) and the image, built now."""
    if os.geteuid() != 0:
        _skip_or_fail("the container tests need root (they may install docker.io and start dockerd)")
    env = dict(os.environ)
    started = False
    if (
        shutil.which("docker") is None
        or subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=60).returncode != 0
    ):
        out = _run([str(DEPLOY / "dockerd.sh"), "start"], env, 600, "starting dockerd").stdout
        env["DOCKER_HOST"] = out.strip().splitlines()[-1].split("=", 1)[1]
        started = True
    try:
        _remove_leftovers(env)
        start = time.monotonic()
        _run([str(DEPLOY / "image.sh")], env, BUILD_TIMEOUT_S, "deploy/image.sh (make image)")
        print(f"\n[container] image {IMAGE} built in {time.monotonic() - start:.0f} s")
        yield env
    finally:
        _remove_leftovers(env)
        if started:
            subprocess.run([str(DEPLOY / "dockerd.sh"), "stop"], env=env, timeout=120)


def _remove_leftovers(env: dict) -> None:
    """Containers of an earlier run that did not clean up: labelled ones, and compose projects
    named erctest* with their networks and volumes."""

    def lines(*args: str) -> list[str]:
        return subprocess.run(
            ["docker", *args], env=env, capture_output=True, text=True, timeout=60
        ).stdout.splitlines()

    ids = lines("ps", "-aq", "--filter", f"label={LABEL}")
    listed = lines("ps", "-a", "--filter", "label=com.docker.compose.project", "--format", PROJECT_FORMAT)
    ids += [i for i, _, project in (line.partition(" ") for line in listed) if project.startswith("erctest")]
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], env=env, capture_output=True, timeout=120)
    networks = [n for n in lines("network", "ls", "--format", "{{.Name}}") if n.startswith("erctest")]
    if networks:
        subprocess.run(["docker", "network", "rm", *networks], env=env, capture_output=True, timeout=60)
    volumes = [v for v in lines("volume", "ls", "--format", "{{.Name}}") if v.startswith("erctest")]
    if volumes:
        subprocess.run(["docker", "volume", "rm", *volumes], env=env, capture_output=True, timeout=60)


def _compose_command(env: dict) -> list[str]:
    """Compose v2 (`docker compose`) where the CLI has it, else the standalone docker-compose
    (Debian's 1.29, installed here when absent)."""
    if subprocess.run(["docker", "compose", "version"], env=env, capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose") is None:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-compose"],
            env={**env, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            timeout=600,
        )
    if shutil.which("docker-compose") is None:
        _skip_or_fail("neither `docker compose` nor docker-compose is available (apt-get install docker-compose)")
    return ["docker-compose"]


class Container:
    """One running container: docker inspect/logs/exec, and its server's address."""

    def __init__(self, env: dict, container_id: str, base: str) -> None:
        self.env, self.id, self.base = env, container_id, base
        self.name = self.inspect()["Name"].lstrip("/")
        self.ready_after: float | None = None

    def inspect(self) -> dict:
        return json.loads(_docker(self.env, "inspect", self.id))[0]

    def logs(self, stderr: bool = True) -> str:
        result = subprocess.run(["docker", "logs", self.id], env=self.env, capture_output=True, text=True, timeout=60)
        return result.stdout + (result.stderr if stderr else "")

    def diagnosis(self) -> str:
        """The container's log without its per-request lines, for failure messages."""
        lines = [line for line in self.logs().splitlines() if '"message": "request"' not in line]
        return "\n".join(lines)[-6000:]

    def exec(self, *cmd: str) -> str:
        return _docker(self.env, "exec", self.id, *cmd, what=f"docker exec {' '.join(cmd)}")

    def started_at(self) -> float:
        """When Docker last started the container (epoch seconds; it writes nanoseconds)."""
        stamp = self.inspect()["State"]["StartedAt"]
        head, _, fraction = stamp.rstrip("Z").partition(".")
        return dt.datetime.fromisoformat(head).replace(tzinfo=dt.timezone.utc).timestamp() + float(f"0.{fraction or 0}")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Seconds from the container's (last) start to /ready 200."""
        restarts = self.inspect()["RestartCount"]
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while time.monotonic() < deadline:
            facts = self.inspect()
            # A container that exits is restarted by its policy: count that as exiting too.
            if not facts["State"]["Running"] or facts["State"]["Restarting"] or facts["RestartCount"] > restarts:
                raise AssertionError(f"container {self.name} exited before /ready:\n{self.diagnosis()}")
            try:
                if httpx.get(f"{self.base}/ready", timeout=2).status_code == 200:
                    self.ready_after = time.time() - self.started_at()
                    return self.ready_after
            except httpx.HTTPError:
                pass
            # A failed load leaves the server up but never ready: stop waiting once it says so.
            if time.monotonic() - checked > 15:
                checked = time.monotonic()
                if "loading the service failed" in self.logs():
                    raise AssertionError(f"container {self.name}: loading failed:\n{self.diagnosis()}")
            time.sleep(1)
        raise AssertionError(f"container {self.name} not ready after {timeout} s:\n{self.diagnosis()}")


def _index_root(settings) -> Path:
    # Resolved: a symlinked index folder would dangle inside the container.
    manifest = require(settings.index_root / "meld" / "manifest.json", "run `erc index build --dataset meld`")
    return manifest.resolve().parent.parent


def documented_plain_run() -> list[str]:
    """The docs' plain `docker run` of the CPU image (no --shm-size, no hardening): the line a new
    user types first, read from the docs so that the test runs what they say."""
    for doc in (DEPLOY / "README.md", ROOT / "README.md"):
        for line in doc.read_text().splitlines():
            command = line.split("#")[0].strip()
            if command.startswith("docker run") and command.endswith("erc:cpu") and "--shm-size" not in command:
                return shlex.split(command)
    raise AssertionError("no plain `docker run ... erc:cpu` line in deploy/README.md or README.md")


def run_as_documented(env: dict, port: int, index_root: Path, *extra: str) -> Container:
    """Start the documented plain command, detached, with the test's port, index folder and clean-up
    label (and ``extra`` flags)."""
    argv = documented_plain_run()
    args = [a.replace("ERC_PORT=8001", f"ERC_PORT={port}").replace("$PWD/index", str(index_root)) for a in argv[2:]]
    assert f"ERC_PORT={port}" in args and any(str(index_root) in a for a in args), argv
    container_id = _docker(env, "run", "-d", "--label", LABEL, *extra, *args, what="docker run")
    return Container(env, container_id, f"http://127.0.0.1:{port}")


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
        # `up` returns once erc is healthy (/ready): erc-2 waits for it (compose.yaml's rolling
        # first start), then reloads the compile cache erc wrote into the shared volume. The bare
        # process starts with it, reloading the host's cache (the rest of the suite compiled the
        # same model): two like starts side by side, on the same cores.
        compose("up", "-d", "--no-build", timeout=READY_TIMEOUT_S)
        bare = ServerProcess(free_port(), env=BARE_ENV, log=tmp / "bare.log")
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
            f"the bare process {bare_ready:.0f} s (the host's cache)"
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
    assert "base" in facts["weights"] and "adapters" in facts["weights"]


def test_compose_runs_hardened_limited_replicas_behind_nginx(deployment):
    """What compose.yaml asks for reaches the containers (compose 1.29 and v2 alike), and the
    balancer sends work to both replicas."""
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


def _predict_all(base: str, payloads: list[tuple[str, dict]]) -> list[str]:
    labels = []
    with httpx.Client(base_url=base, timeout=300) as client:
        for path, body in payloads:
            response = client.post(path, json=body)
            assert response.status_code == 200, f"{base}{path}: {response.status_code} {response.text[:300]}"
            data = response.json()
            if path == "/predict":
                labels.append(data["label"])
            else:
                labels.extend(p["label"] for r in data["results"] for p in r["predictions"])
    return labels


def test_container_answers_the_same_labels_as_the_bare_process(deployment):
    payloads = [p for p in deployment["payloads"] if p[0] == "/predict"][:6] + [
        p for p in deployment["payloads"] if p[0] == "/predict_dialogue"
    ][:2]
    bare = _predict_all(deployment["bare"].base, payloads)
    contained = _predict_all(deployment["a"].base, payloads)
    assert len(bare) == len(contained) >= 10
    same = sum(a == b for a, b in zip(bare, contained))
    print(f"\n[container] {same}/{len(bare)} labels equal to the bare process's")
    assert bare == contained


def test_container_runs_unprivileged_under_tini(deployment):
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
    """`docker stop` of one replica while 4 clients send 60 requests through compose's nginx: the
    replica drains (503 for new work, which nginx retries on the other; in-flight work finishes),
    exits by itself, and stays stopped (unless-stopped); no request fails."""
    survivor, victim, nginx = deployment["a"], deployment["b"], deployment["nginx"]
    try:
        since = len(nginx.logs(stderr=False).splitlines())
        fired = threading.Event()
        stopper: list[threading.Thread] = []

        def progress(sent: int) -> None:
            if sent >= 15 and not fired.is_set():
                fired.set()
                t = threading.Thread(
                    target=subprocess.run,
                    args=(["docker", "stop", "-t", "90", victim.id],),
                    kwargs={"env": deployment["env"], "capture_output": True, "timeout": 150},
                )
                t.start()
                stopper.append(t)

        stats = run_load(nginx.base, deployment["payloads"], total=60, workers=4, on_progress=progress)
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
        assert stats["succeeded"] == stats["sent"] == 60
        state = victim.inspect()["State"]
        logs = victim.logs()
        assert not state["Running"], "docker stop returned but the container still runs"
        assert "drained in" in logs, logs[-3000:]
        # Stopped by the drain, not by docker's SIGKILL after the timeout (137) or the OOM killer.
        assert state["ExitCode"] in (0, 143) and not state["OOMKilled"], (state, logs[-2000:])
        time.sleep(3)
        assert not victim.inspect()["State"]["Running"], "a stopped replica was restarted (unless-stopped)"
        assert httpx.get(f"{survivor.base}/ready", timeout=5).status_code == 200
    finally:
        # Back as the other tests expect it, whatever their order: both replicas serving.
        if not victim.inspect()["State"]["Running"]:
            _docker(deployment["env"], "start", victim.id, what="docker start")
        victim.wait_ready()


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


def test_the_documented_plain_docker_run_gets_ready(docker_env, settings):
    """Docker's default /dev/shm is 64 MiB: vLLM's message queues (400 MiB by its defaults) must
    shrink to fit, and the service answer as usual."""
    container = run_as_documented(docker_env, free_port(), _index_root(settings))
    try:
        ready = container.wait_ready()
        print(f"\n[container] plain docker run -> /ready in {ready:.0f} s")
        assert container.exec("df", "-m", "--output=size", "/dev/shm").split()[-1] == "64"
        assert "message queue chunks shrink" in container.logs()
        body = {"dialogue": {"turns": [{"speaker": "A", "text": "I got the job!"}]}}
        response = httpx.post(f"{container.base}/predict", json=body, timeout=120)
        assert response.status_code == 200, response.text
    finally:
        subprocess.run(["docker", "rm", "-f", container.id], env=docker_env, capture_output=True, timeout=120)


def test_a_start_that_cannot_load_exits_with_its_cause_and_fix(docker_env, settings):
    """A /dev/shm too small even for the smallest queues: the server logs the cause and the flag
    that fixes it, and the container exits with the configuration error's status, instead of
    idling unready."""
    container = run_as_documented(docker_env, free_port(), _index_root(settings), "--shm-size", "8m")
    try:
        deadline = time.monotonic() + 300
        while container.inspect()["State"]["Running"] and time.monotonic() < deadline:
            time.sleep(1)
        state = container.inspect()["State"]
        assert not state["Running"], f"still running after 300 s:\n{container.diagnosis()}"
        logs = container.logs()
        assert state["ExitCode"] == EXIT_CONFIG, (state["ExitCode"], logs[-3000:])
        assert "/dev/shm" in logs and "--shm-size 1g" in logs and "a restart will not fix this" in logs, logs[-3000:]
    finally:
        subprocess.run(["docker", "rm", "-f", container.id], env=docker_env, capture_output=True, timeout=120)
