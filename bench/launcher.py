"""One way to start ``erc serve`` in a child process and wait for it, shared by the benchmark and
the tests (the deployment, container and drain tests run the same launcher)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    """A TCP port free now on every interface, below the kernel's ephemeral range: a port the OS
    handed out (bind to 0) could be handed out again before the caller binds it, to any process
    that binds to 0 meanwhile, vLLM's engine among them (seen: docker-proxy's bind of compose's
    published port failed that way after the minutes `up` waits for a healthy replica)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port found in 10000-{low - 1}")


class ServerProcess:
    """``erc serve`` on ``127.0.0.1:port`` in its own process group, so that stopping it stops
    the engine's children too. ``env`` is added to this process's environment; the output goes
    to ``log`` (a path) or nowhere. ``sample_memory`` tracks the peak RSS of the whole tree."""

    def __init__(
        self, port: int, env: dict[str, str] | None = None, log: Path | None = None, sample_memory: bool = False
    ) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log_path = log
        self._log: IO[bytes] | int = log.open("wb") if log is not None else subprocess.DEVNULL
        erc = str(Path(sys.executable).with_name("erc"))
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [erc, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.peak_mb = 0.0
        self._stop = threading.Event()
        if sample_memory:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import psutil

        root = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                self.peak_mb = max(self.peak_mb, sum(p.memory_info().rss for p in procs) / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds from start to ``/ready`` answering 200; raises if the process exits first."""
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                where = f"; see {self.log_path}" if self.log_path else ""
                raise RuntimeError(f"the server on port {self.port} exited during start-up{where}")
            try:
                if httpx.get(f"{self.base}/ready", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server on port {self.port} was not ready after {timeout} s")

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the server's process group."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> None:
        """``sig`` (default: the graceful SIGTERM), then SIGKILL if it has not exited in ``timeout``."""
        self._stop.set()
        if self.proc.poll() is None:
            self.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.send_signal(signal.SIGKILL)
                self.proc.wait()
        if not isinstance(self._log, int):
            self._log.close()
