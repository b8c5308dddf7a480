"""Encoder-only micro-benchmark: milliseconds per call of ``Encoder.embed`` for one utterance and
for a batch of 8 (the load of ``/predict`` at concurrency 8 with micro-batching), per backend, on
MELD dev utterances. Backends are interleaved round by round, so a noisy neighbour on the CPU
slows all of them alike; the median round is reported.

    python -m bench.encoder [--threads 1] [--rounds 5] [--backends torch,onnx,openvino]
"""

from __future__ import annotations

import argparse
import statistics
import time

from service.data import load_split
from service.retrieval import Encoder
from service.settings import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="Intra-op threads (0: the runtime's default).")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--utterances", type=int, default=160)
    parser.add_argument("--backends", default="torch,onnx,openvino")
    args = parser.parse_args()
    settings = get_settings()
    texts = [t.text for d in load_split(settings.data_dir, "meld", "valid", "csv") for t in d.turns]
    texts = texts[: args.utterances]
    encoders = {}
    for name in args.backends.split(","):
        encoder = Encoder.from_settings(settings, backend=name, threads=args.threads)
        if encoder.backend != name:
            raise SystemExit(f"backend {name} is not available (see the warning above)")
        encoders[name] = encoder
    timings: dict[tuple[str, int], list[float]] = {(n, b): [] for n in encoders for b in (1, 8)}
    for _ in range(args.rounds):
        for name, encoder in encoders.items():
            for size in (1, 8):
                batches = [texts[i : i + size] for i in range(0, len(texts), size)]
                encoder.embed(batches[0])
                start = time.perf_counter()
                for batch in batches:
                    encoder.embed(batch)
                timings[(name, size)].append(1000 * (time.perf_counter() - start) / len(batches))
    print(f"threads={args.threads}, {len(texts)} MELD dev utterances, median of {args.rounds} rounds (min-max)")
    print("| backend | ms per utterance (batch 1) | ms per batch of 8 | ms per utterance in a batch of 8 |")
    print("|---|---|---|---|")
    for name in encoders:
        one, eight = timings[(name, 1)], timings[(name, 8)]
        print(
            f"| {name} | {statistics.median(one):.2f} ({min(one):.2f}-{max(one):.2f}) "
            f"| {statistics.median(eight):.1f} ({min(eight):.1f}-{max(eight):.1f}) "
            f"| {statistics.median(eight) / 8:.2f} |"
        )


if __name__ == "__main__":
    main()
