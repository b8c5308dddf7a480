"""The labelling pipeline: reader -> chunks -> backend -> crash-safe store, streaming.

At most ``inflight`` chunks are held at once (read, labelling, or being written), so memory is
bounded by the chunk size whatever the corpus size; chunks are committed in input order, so the
output is in input order. The next chunk is read and submitted while the previous one is still
labelled: the engine is never idle between chunks.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labeling.backends import Backend
from labeling.readers import Columns, Record, chunks, input_format, open_reader
from labeling.store import Rows, Store, errors_path


@dataclass
class Options:
    input: Path
    output: Path
    input_format: str | None = None
    columns: Columns = field(default_factory=Columns)
    #: A chunk is cut once it holds this many utterances (a dialogue is never split)...
    chunk_utterances: int = 256
    #: ... or this many dialogues (bounds a chunk of bad records or one-turn dialogues).
    chunk_dialogues: int = 1024
    #: Chunks held at once; a crash loses at most these.
    inflight: int = 2
    resume: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass
class Summary:
    """What a run did (this run only: dialogues a resumed run skipped are not counted)."""

    mode: str
    model: str
    label_set: str
    dialogues: int
    utterances: int
    errors: int
    #: Labelling time: from the first chunk read to the output in place (engine loading apart).
    seconds: float
    load_seconds: float
    output: str
    errors_file: str | None
    resumed_from: int = 0
    client: dict[str, Any] = field(default_factory=dict)

    @property
    def utterances_per_s(self) -> float:
        return self.utterances / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "utterances_per_s": self.utterances_per_s}

    def lines(self) -> list[str]:
        out = [
            f"labelled {self.dialogues} dialogues, {self.utterances} utterances; {self.errors} errors; "
            f"{self.seconds:.1f} s ({self.utterances_per_s:.2f} utterances/s; loading {self.load_seconds:.1f} s "
            f"before); model {self.model}, label set {self.label_set}",
            f"output: {self.output}",
        ]
        if self.resumed_from:
            out.append(f"resumed after {self.resumed_from} dialogues of the input committed earlier")
        if self.errors_file:
            out.append(f"errors: {self.errors_file}")
        if self.client.get("retries"):
            out.append(f"retried: {', '.join(f'{k}: {v}' for k, v in sorted(self.client['retries'].items()))}")
        return out


def fingerprint(options: Options, fmt: str) -> dict[str, Any]:
    """What a resumed run must share with the run it continues: the same input bytes, read
    the same way."""
    stat = options.input.stat()
    return {
        "input": str(options.input.resolve()),
        "input_size": stat.st_size,
        "input_mtime_ns": stat.st_mtime_ns,
        "input_format": fmt,
        "columns": asdict(options.columns) if fmt != "jsonl" else None,
    }


def error_entry(record: Record, reason: str, fmt: str) -> dict[str, Any]:
    where = "row" if fmt == "parquet" else "line"
    return {where: record.line, "dialogue_id": record.dialogue_id, "reason": reason}


def output_id(record: Record) -> str:
    """A dialogue without an id (a JSONL line without ``id``) is named by its line."""
    return record.dialogue_id if record.dialogue_id is not None else f"line-{record.line}"


def _progress(options: Options, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=None,
        initial=initial,
        unit=" utt",
        desc="labelling",
        disable=not options.progress,
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stderr,
    )


async def label_async(options: Options, backend: Backend, mode: str) -> Summary:
    fmt = input_format(options.input, options.input_format)
    reader = open_reader(options.input, fmt, options.columns)
    store = Store(options.output, fingerprint(options, fmt), resume=options.resume, overwrite=options.overwrite)
    resumed_from = store.next_ordinal
    began = time.monotonic()
    try:
        await backend.start()
        load_s = time.monotonic() - began
        store.check_model(backend.model, backend.labels)
        summary = await _pipeline(options, backend, reader, store, fmt)
    except BaseException:
        # A run that committed nothing leaves nothing to resume.
        store.discard_if_empty()
        raise
    finally:
        await backend.close()
    return Summary(
        mode=mode,
        model=backend.model,
        label_set=backend.label_set,
        load_seconds=load_s,
        output=str(options.output),
        errors_file=str(errors_path(options.output)) if summary["errors_total"] else None,
        resumed_from=resumed_from,
        client=backend.stats(),
        **{k: v for k, v in summary.items() if k != "errors_total"},
    )


def chunk_rows(chunk: list[Record], outcomes: list, backend: Backend, fmt: str) -> tuple[Rows, list[dict], int]:
    """A labelled chunk's output rows, its errors, and how many dialogues it labelled."""
    rows, errors, dialogues = Rows(), [], 0
    results = iter(outcomes)
    for record in chunk:
        if record.dialogue is None:
            errors.append(error_entry(record, record.error or "not readable", fmt))
            continue
        outcome = next(results)
        if outcome.error is not None:
            errors.append(error_entry(record, outcome.error, fmt))
            continue
        dialogues += 1
        name = output_id(record)
        model = outcome.model or backend.model
        for turn, (t, p) in enumerate(zip(record.dialogue.turns, outcome.predictions)):
            rows.add(name, turn, t.speaker, p.label, p.scores, backend.label_set, model)
    return rows, errors, dialogues


async def _pipeline(options: Options, backend: Backend, reader: Any, store: Store, fmt: str) -> dict[str, Any]:
    started = time.monotonic()
    batches = chunks(reader.records(store.next_ordinal), options.chunk_utterances, options.chunk_dialogues)
    bar = _progress(options, store.state["utterances"])
    read_utterances = store.state["utterances"]
    done = {"dialogues": 0, "utterances": 0, "errors": 0}

    async def labelled(chunk: list[Record]) -> tuple[list[Record], list]:
        good = [r.dialogue for r in chunk if r.dialogue is not None]
        return chunk, await backend.label(good)

    async def commit(chunk: list[Record], outcomes: list) -> None:
        rows, errors, dialogues = chunk_rows(chunk, outcomes, backend, fmt)
        await asyncio.to_thread(store.commit, rows, errors, chunk[-1].ordinal + 1, dialogues)
        done["dialogues"] += dialogues
        done["utterances"] += len(rows)
        done["errors"] += len(errors)
        bar.update(sum(r.utterances for r in chunk))

    pending: deque[asyncio.Task] = deque()
    try:
        while True:
            # Reading and parsing off the event loop, where the engine's output handler runs.
            chunk = await asyncio.to_thread(next, batches, None)
            if chunk is None:
                break
            read_utterances += sum(r.utterances for r in chunk)
            if reader.total_utterances is not None:
                bar.total = reader.total_utterances
            elif reader.fraction() > 0:
                bar.total = max(bar.n, int(read_utterances / reader.fraction()))
            pending.append(asyncio.create_task(labelled(chunk)))
            while len(pending) >= options.inflight:
                await commit(*await pending.popleft())
        while pending:
            await commit(*await pending.popleft())
        bar.total = bar.n
        await asyncio.to_thread(store.finalize, backend.labels)
    finally:
        for task in pending:
            task.cancel()
        bar.close()
    return {
        **done,
        "errors_total": store.state["errors"],
        "seconds": time.monotonic() - started,
    }


def label(options: Options, backend: Backend, mode: str) -> Summary:
    return asyncio.run(label_async(options, backend, mode))


def write_stats(summary: Summary, path: Path) -> None:
    path.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")


def in_process_backend(label_set: str | None) -> Backend:
    from labeling.backends import InProcess
    from service.settings import get_settings

    return InProcess(get_settings(), label_set, fresh_process=True)


def remote_backend(url: str, label_set: str | None, concurrency: int) -> Backend:
    from labeling.backends import Remote

    return Remote(url, label_set, concurrency=concurrency, api_key=os.environ.get("ERC_API_KEY"))
