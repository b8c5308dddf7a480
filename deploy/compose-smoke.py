"""Bring deploy/compose.yaml up (2 replicas + nginx), send load through the balancer, `docker
stop` one replica after the 15th request, report, and take it down again.

    DOCKER_HOST=... ERC_DATA_DIR=... .venv/bin/python deploy/compose-smoke.py

Uses the images already in the daemon's store (`make image`; the nginx image is built by
compose from deploy/nginx.Dockerfile). Prints what it saw; exit status 1 if a request failed."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_deploy import _payloads, run_load  # noqa: E402

COMPOSE = ["docker-compose", "--compatibility", "-f", str(ROOT / "deploy" / "compose.yaml"), "-p", "ercsmoke"]
PORT = os.environ.get("ERC_LB_PORT", "8080")


def sh(*cmd: str, timeout: float = 600) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout).stdout


def main() -> int:
    env_note = {"ERC_KV_CACHE_GIB": os.environ.setdefault("ERC_KV_CACHE_GIB", "1")}
    start = time.monotonic()
    subprocess.run([*COMPOSE, "up", "-d", "--no-build"], check=True, timeout=900)
    try:
        up = time.monotonic() - start
        replicas = sh(*COMPOSE, "ps", "-q", "erc").split()
        print(f"compose up -d returned after {up:.0f} s (nginx waits for a healthy replica); replicas: {len(replicas)} {env_note}")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ready = [json.loads(sh("docker", "inspect", r))[0]["State"]["Health"]["Status"] for r in replicas]
            if all(s == "healthy" for s in ready):
                break
            time.sleep(2)
        print(f"both replicas healthy {time.monotonic() - start:.0f} s after up: {ready}")
        assert httpx.get(f"http://127.0.0.1:{PORT}/ready", timeout=5).status_code == 200
        victim = replicas[1]
        fired = threading.Event()

        def progress(sent: int) -> None:
            if sent >= 15 and not fired.is_set():
                fired.set()
                threading.Thread(target=subprocess.run, args=(["docker", "stop", "-t", "90", victim],), kwargs={"capture_output": True}).start()

        data = Path(os.environ.get("ERC_DATA_DIR", ROOT / "data"))
        stats = run_load(f"http://127.0.0.1:{PORT}", _payloads(data), total=60, workers=4, on_progress=progress)
        time.sleep(5)
        state = json.loads(sh("docker", "inspect", victim))[0]["State"]
        out = subprocess.run(["docker", "logs", victim], capture_output=True, text=True)
        logs = out.stdout + out.stderr
        drained = [line for line in logs.splitlines() if "drained in" in line]
        lb = subprocess.run([*COMPOSE, "logs", "--no-color", "nginx"], capture_output=True, text=True).stdout
        retried = sum(1 for line in lb.splitlines() if re.search(r"upstream=\S+, ", line))
        print(f"load through nginx: sent {stats['sent']}, succeeded {stats['succeeded']}, failed {stats['failed']}; errors {stats['errors'][:3]}")
        print(f"stopped replica: running={state['Running']} exit={state['ExitCode']}; drain log: {drained[:1]}")
        print(f"nginx access lines naming two upstreams (retried): {retried}")
        return 0 if stats["failed"] == 0 and drained else 1
    finally:
        subprocess.run([*COMPOSE, "down", "-t", "30"], timeout=300)


if __name__ == "__main__":
    sys.exit(main())
