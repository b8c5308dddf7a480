"""Throughput with Docker's default 64 MiB /dev/shm against 1 GiB (``--shm-size 1g``).

With a small /dev/shm the engine's message queues get smaller chunks
(:mod:`service.engine_process`), and a step's message larger than a chunk takes vLLM's socket
path. This runs the bare ``erc serve`` in a private mount namespace whose /dev/shm is a tmpfs of
the given size (what ``docker run --shm-size`` gives a container; needs root and ``unshare``),
alternating the sizes, and times ``/predict_dialogue`` on the same MELD test dialogues.

    python -m bench.shm --rounds 2 --dialogues 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.launcher import free_port
from service.data import load_split
from service.settings import Settings


def _serve(shm_mib: int, port: int, log: Path) -> subprocess.Popen:
    erc = str(Path(sys.executable).with_name("erc"))
    script = f"mount -t tmpfs -o size={shm_mib}m tmpfs /dev/shm && exec {erc} serve --host 127.0.0.1 --port {port}"
    # A slow hour must not turn the timed batch into a 504.
    env = {**os.environ, "ERC_REQUEST_TIMEOUT_S": "900"}
    return subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("not ready")


def measure(shm_mib: int, body: dict, warm: dict, log: Path) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(shm_mib, port, log)
    try:
        _wait_ready(base, proc)
        httpx.post(f"{base}/predict_dialogue", json=warm, timeout=600).raise_for_status()
        start = time.perf_counter()
        response = httpx.post(f"{base}/predict_dialogue", json=body, timeout=600)
        wall = time.perf_counter() - start
        response.raise_for_status()
        count = sum(len(r["predictions"]) for r in response.json()["results"])
        shrunk = "message queue chunks shrink" in log.read_text(errors="replace")
        return {
            "shm_mib": shm_mib,
            "utterances": count,
            "wall_s": round(wall, 2),
            "utterances_per_s": round(count / wall, 2),
            "chunks_shrunk": shrunk,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dialogues", type=int, default=10)
    parser.add_argument("--sizes", default="64,1024", help="MiB of /dev/shm, alternated")
    parser.add_argument("--logs", type=Path, default=Path("/tmp"))
    args = parser.parse_args()
    dialogues = load_split(Settings().data_dir, "meld", "test", "csv")
    api = [{"id": d.id, "turns": [{"speaker": t.speaker, "text": t.text} for t in d.turns]} for d in dialogues]
    body = {"dialogues": api[: args.dialogues]}
    # The warm-up batch is as large as the timed one: the engine meets the same step shapes first.
    warm = {"dialogues": api[-args.dialogues :]}
    results = []
    for round_ in range(args.rounds):
        for size in map(int, args.sizes.split(",")):
            result = measure(size, body, warm, args.logs / f"shm-{size}-{round_}.log")
            print(json.dumps(result), flush=True)
            results.append(result)
    for size in map(int, args.sizes.split(",")):
        rates = [r["utterances_per_s"] for r in results if r["shm_mib"] == size]
        print(f"/dev/shm {size} MiB: {', '.join(map(str, rates))} utterances/s")


if __name__ == "__main__":
    main()
