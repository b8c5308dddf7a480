"""What the container tests share (a pytest plugin, loaded by conftest.py): the Docker daemon and
the image (`docker_env`, built once a session), and helpers that drive containers.

Needs root (it may install docker.io and docker-compose and start a Docker daemon of its own,
which it stops again at the session's end) and the built index; skipped without them on a
developer machine, failed under CI."""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI, require

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


@pytest.fixture(scope="session")
def docker_env():
    """A Docker daemon (the one already answering, else our own) and the image, built now; one
    for the session, shared by the container modules."""
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

    def logs(self, stderr: bool = True, tail: int | None = None) -> str:
        """The container's log (its last ``tail`` lines)."""
        cmd = ["docker", "logs", *(["--tail", str(tail)] if tail else []), self.id]
        result = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
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
            # A failed load leaves the server up but never ready: stop waiting once it says so. Only
            # a shortcut: a daemon too busy to answer (engines compiling on every core) is asked
            # again later, and the deadline still holds.
            if time.monotonic() - checked > 15:
                checked = time.monotonic()
                try:
                    failed = "loading the service failed" in self.logs(tail=200)
                except subprocess.TimeoutExpired:
                    failed = False
                if failed:
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
