"""The engine processes' lifetime and shared memory (service/engine_process.py), and how a failed
start is explained (service/startup.py), without an engine: plain child processes stand in for
vLLM's engine core, with a handler of their own as vLLM installs one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service import engine_process
from service.startup import EXIT_CONFIG, EXIT_FAILED, StartupError, explain

#: A stand-in engine process: guarded as a spawned engine process is, with vLLM's kind of handler.
CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from service import engine_process

    def handler(signum, frame):
        print("stopping on", signal.Signals(signum).name, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    engine_process.guard()
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """
)


def _start(env: dict[str, str], script: str = CHILD) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_group_signals_are_ignored_until_the_server_stops_the_engine(tmp_path):
    stop = tmp_path / "stop"
    engine_process.mark_started(stop)
    child = _start({engine_process.STOP_FILE_ENV: str(stop), engine_process.SERVER_PID_ENV: str(os.getpid())})
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            child.send_signal(sig)
            time.sleep(0.5)
            assert child.poll() is None, f"the engine process stopped on a {sig.name} the server did not send"
        engine_process.request_stop(stop)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0
    assert "SIGTERM ignored" in out and "SIGINT ignored" in out
    assert "stopping on SIGTERM" in out


def test_a_signal_stops_an_engine_that_has_not_started(tmp_path):
    """vLLM tears a failed start down with SIGTERM: before the server marks the engine started,
    the signal is honoured (else the start hangs instead of exiting with its failure status)."""
    stop = tmp_path / "stop"
    child = _start({engine_process.STOP_FILE_ENV: str(stop), engine_process.SERVER_PID_ENV: str(os.getpid())})
    try:
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0 and "stopping on SIGTERM" in out and "ignored" not in out


def test_an_engine_process_stops_when_its_server_dies(tmp_path):
    """The 'server' starts the engine process and is then SIGKILLed: the engine process sees its
    parent gone and runs its own handler."""
    server = textwrap.dedent(
        f"""
        import os, subprocess, sys
        os.environ["{engine_process.STOP_FILE_ENV}"] = {str(tmp_path / "stop")!r}
        os.environ["{engine_process.SERVER_PID_ENV}"] = str(os.getpid())
        child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=open({str(tmp_path / "out")!r}, "w"))
        print(child.pid, flush=True)
        child.wait()
        """
    )
    engine_process.mark_started(tmp_path / "stop")  # a started engine: only the watchdog stops it
    proc = subprocess.Popen([sys.executable, "-c", server], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    engine_pid = int(proc.stdout.readline())
    out = tmp_path / "out"
    deadline = time.monotonic() + 30
    while "ready" not in (out.read_text() if out.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 15
    while _alive(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(engine_pid), "the engine process outlived its server"
    assert "stopping on SIGTERM" in out.read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A reparented zombie is gone for our purpose.
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" not in status.read_text()


def test_the_server_itself_and_unrelated_processes_are_not_guarded(monkeypatch):
    monkeypatch.setenv(engine_process.SERVER_PID_ENV, str(os.getpid()))
    monkeypatch.setenv(engine_process.STOP_FILE_ENV, "/nonexistent/stop")
    before = signal.getsignal(signal.SIGTERM)
    engine_process.guard()
    assert signal.getsignal(signal.SIGTERM) is before
    assert not getattr(signal.signal, "_erc_guarded", False)


@pytest.mark.parametrize(
    "free_mib, chunk_mib",
    [(64, 1), (128, 3), (1024, 25), (8, 1)],
)
def test_message_queue_chunks_fit_half_of_dev_shm(free_mib, chunk_mib):
    chunk = engine_process.chunk_limit(free_mib << 20)
    assert chunk == chunk_mib << 20
    if free_mib >= 2 * engine_process.QUEUES * engine_process.CHUNKS:
        assert engine_process.QUEUES * engine_process.CHUNKS * chunk <= (free_mib << 20) // 2


def test_message_queues_shrink_only_when_dev_shm_is_small(monkeypatch):
    """Docker's default 64 MiB: vLLM's 16 and 24 MiB chunks (400 MiB in all) shrink to 1 MiB; with
    1 GiB free they stay as vLLM sizes them. Readers open the creator's size."""
    from vllm.distributed.device_communicators import shm_broadcast

    engine_process.fit_message_queues()
    for free_mib, expected in ((64, (1, 1)), (1024, (16, 24))):
        monkeypatch.setattr(engine_process, "shm_free_bytes", lambda free=free_mib: free << 20)
        # A fresh limit per case: a process fixes its limit with its first buffer.
        monkeypatch.setattr(engine_process, "_LIMIT", {})
        sizes = []
        for mib in (16, 24):
            ring = shm_broadcast.ShmRingBuffer(1, mib << 20, 10)
            reader = shm_broadcast.ShmRingBuffer(*ring.handle())
            assert reader.max_chunk_bytes == ring.max_chunk_bytes
            sizes.append(ring.max_chunk_bytes >> 20)
            del reader, ring
        assert tuple(sizes) == expected


def test_explain_names_the_cause_and_the_fix():
    shm = RuntimeError("Insufficient space in /dev/shm for shared-memory allocation: 160 MiB required, 64 MiB free")
    failure = explain(RuntimeError("Engine core initialization failed").with_traceback(None))
    assert not failure.permanent and failure.exit_code == EXIT_FAILED
    try:
        raise RuntimeError("loading failed") from shm
    except RuntimeError as exc:
        failure = explain(exc)
    assert failure.permanent and failure.exit_code == EXIT_CONFIG
    assert "--shm-size 1g" in failure.message() and "a restart will not fix this" in failure.message()
    own = StartupError("the model folder /x holds no checkpoint", "run `erc weights build`", permanent=True)
    assert explain(own) is own
    assert "erc weights build" in own.message()


def test_int8_layers_in_float32_keep_off_the_bfloat16_only_amx_kernel(monkeypatch):
    """service.cpu_kernels: vLLM's AMX int8 kernel takes bfloat16 or float16 activations only, so
    an int8 layer of a float32 model must get the oneDNN kernel; other dtypes are asked as before."""
    import torch
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    from service import cpu_kernels

    asked = []
    monkeypatch.setattr(cpu, "check_cpu_sgl_kernel", lambda n, k, dtype: asked.append(dtype) or True)
    cpu_kernels.register()
    cpu_kernels.register()  # idempotent: wrapped once
    before = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float32)
        assert cpu.check_cpu_sgl_kernel(64, 64, torch.int8) is False
        assert cpu.check_cpu_sgl_kernel(64, 64, torch.bfloat16) is True
        torch.set_default_dtype(torch.bfloat16)
        assert cpu.check_cpu_sgl_kernel(64, 64, torch.int8) is True
    finally:
        torch.set_default_dtype(before)
    assert asked == [torch.bfloat16, torch.int8]
