"""Where the time goes: py-spy samples of the API process and the engine's worker process while
the service answers the benchmark's two loads (``/predict_dialogue`` over MELD test dialogues,
then ``/predict`` at concurrency 8). Prints the top frames of each; raw stacks go to ``--out``.

    python -m bench.profile [--dialogues 40] [--out runs/profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from bench.launcher import ServerProcess
from service.data import load_split
from service.settings import get_settings


def _spy(pid: int, out: Path, seconds: int) -> subprocess.Popen:
    py_spy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "-d",
            str(seconds),
            "-r",
            "50",
            "--format",
            "raw",
            "-o",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def summarize(raw: Path, top: int = 12) -> str:
    """Self time per frame and inclusive time of the frames on most stacks, as percentages."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    lines = [f"{raw.name}: {total} samples", "  self:"]
    lines += [f"    {100 * n / max(total, 1):5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("  inclusive (below 99%):")
    lines += [
        f"    {100 * n / max(total, 1):5.1f}%  {frame}" for frame, n in inclusive.most_common(80) if n < 0.99 * total
    ][:top]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogues", type=int, default=40)
    parser.add_argument("--port", type=int, default=8766)
    parser.add_argument("--out", type=Path, default=Path("runs/profile"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    data = load_split(settings.data_dir, "meld", "test", "csv")[: args.dialogues]
    launched = ServerProcess(args.port, log=args.out / "serve.log")
    server, base = launched.proc, launched.base
    try:
        launched.wait_ready()
        workers = [
            p
            for p in psutil.Process(server.pid).children(recursive=True)
            if "Worker" in p.name() or "EngineCore" in p.name()
        ]
        engine = workers[-1].pid  # the worker runs the model; without one, the engine core does
        turns = lambda d: [{"speaker": t.speaker, "text": t.text} for t in d.turns]  # noqa: E731
        batch = {"dialogues": [{"id": d.id, "turns": turns(d)} for d in data]}
        singles = [{"dialogue": {"turns": turns(d)}, "target": k} for d in data for k in range(len(d.turns))]

        spies = [
            _spy(server.pid, args.out / "api-predict_dialogue.txt", 20),
            _spy(engine, args.out / "engine-predict_dialogue.txt", 20),
        ]
        time.sleep(1)
        start = time.perf_counter()
        httpx.post(base + "/predict_dialogue", json=batch, timeout=900).raise_for_status()
        print(
            f"/predict_dialogue: {len(singles)} utterances in {time.perf_counter() - start:.1f} s (under the profiler)"
        )
        for s in spies:
            s.wait()

        async def load(n: int = 400, concurrency: int = 8) -> None:
            queue = list(range(n))
            async with httpx.AsyncClient(base_url=base, timeout=600) as client:

                async def worker() -> None:
                    while queue:
                        (await client.post("/predict", json=singles[queue.pop() % len(singles)])).raise_for_status()

                await asyncio.gather(*(worker() for _ in range(concurrency)))

        spies = [
            _spy(server.pid, args.out / "api-predict-c8.txt", 12),
            _spy(engine, args.out / "engine-predict-c8.txt", 12),
        ]
        start = time.perf_counter()
        asyncio.run(load())
        print(f"/predict at concurrency 8: 400 requests in {time.perf_counter() - start:.1f} s (under the profiler)")
        for s in spies:
            s.wait()
    finally:
        launched.stop()
    for raw in sorted(args.out.glob("*.txt")):
        print(summarize(raw))


if __name__ == "__main__":
    main()
