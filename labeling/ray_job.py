"""``erc label --ray``: the same in-process predictor, one engine per actor of a Ray Data actor
pool, on a local Ray or a cluster (docs/labelling.md).

1. The driver reads the input with the same streaming reader as the other modes (the same
   validation, line numbers and contiguity rule) and writes the dialogues, one per row, as
   Parquet files into ``OUTPUT.ray/input/``; bad records go straight to the errors. Reading is
   never the bottleneck (a driver parses far more dialogues per second than an engine labels).
2. ``ray.data.read_parquet`` -> ``map_batches(RayLabeller, concurrency=N)``: each actor loads the
   model, the indexes and an engine exactly as ``erc serve`` does
   (:class:`labeling.backends.InProcess`), in a process of its own, and labels a block of
   dialogues per call; ``write_parquet`` writes the rows to ``OUTPUT.ray/output/``.
3. The driver merges the written files by input position into ``OUTPUT`` (and the errors file),
   through the same crash-safe store as the other modes, and removes ``OUTPUT.ray/``.

``OUTPUT.ray/`` must be a path every node reads and writes (a shared volume on a cluster), and
the model and indexes must sit at the same paths on every node (the image holds them, or a
shared volume): the actors read them from ``ERC_*`` settings the driver ships in the job's
runtime environment, with paths made absolute.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from labeling.readers import InputError, chunks, input_format, open_reader
from labeling.run import Options, Summary, error_entry, fingerprint, output_id
from labeling.store import ResumeError, Rows, Store, errors_path, output_format, parts_dir, require_pyarrow

#: Columns of the rows the actors write: every utterance, and one row per dialogue that failed.
OUT_COLUMNS = ("ordinal", "line", "dialogue_id", "turn", "speaker", "label", "scores", "label_set", "model", "error")


class RayLabeller:
    """A Ray Data callable class: one engine per actor, loaded once, kept across batches.

    An actor is a fresh process, like ``erc serve``'s, but its engine's processes are spawned,
    not forked (service/start_method.py): vLLM refuses to fork inside a Ray actor (a child forked
    from a Ray worker inherits the state of Ray's own threads) and switches to spawn whatever it is
    told, so the service is told spawn up front and loads its encoder alongside the engine's start
    rather than waiting for a fork that never comes. The engine lives on one event loop for the
    actor's life: vLLM binds its output handler to the loop it first ran on."""

    def __init__(self, label_set: str | None) -> None:
        from labeling.backends import InProcess
        from service.settings import Settings

        self.loop = asyncio.new_event_loop()
        self.backend = InProcess(Settings(), label_set, fresh_process=False)
        self.loop.run_until_complete(self.backend.start())

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        from service.schemas import DialogueIn

        ordinals = batch.column("ordinal").to_pylist()
        lines = batch.column("line").to_pylist()
        names = batch.column("dialogue_id").to_pylist()
        dialogues = [DialogueIn.model_validate_json(s) for s in batch.column("dialogue").to_pylist()]
        outcomes = self.loop.run_until_complete(self.backend.label(dialogues))
        out: dict[str, list] = {c: [] for c in OUT_COLUMNS}

        def row(**values: Any) -> None:
            for c in OUT_COLUMNS:
                out[c].append(values.get(c))

        b = self.backend
        for ordinal, line, name, dialogue, outcome in zip(ordinals, lines, names, dialogues, outcomes):
            if outcome.error is not None:
                row(ordinal=ordinal, line=line, dialogue_id=name, turn=-1, error=outcome.error)
                continue
            for turn, (t, p) in enumerate(zip(dialogue.turns, outcome.predictions or ())):
                row(
                    ordinal=ordinal,
                    line=line,
                    dialogue_id=name,
                    turn=turn,
                    speaker=t.speaker,
                    label=p.label,
                    scores=json.dumps(p.scores),
                    label_set=b.label_set,
                    model=b.model,
                )
        schema = pa.schema(
            [("ordinal", pa.int64()), ("line", pa.int64()), ("dialogue_id", pa.string()), ("turn", pa.int32())]
            + [(c, pa.string()) for c in OUT_COLUMNS[4:]]
        )
        return pa.table(out, schema=schema)


def _runtime_env() -> dict[str, Any]:
    """The settings the actors need, as the driver resolved them (paths absolute)."""
    from service.settings import get_settings

    settings = get_settings()
    env = {k: v for k, v in os.environ.items() if k.startswith(("ERC_", "VLLM_"))}
    env["ERC_INDEX_ROOT"] = str(Path(settings.index_root).resolve())
    env["ERC_WEIGHTS_ROOT"] = str(Path(settings.weights_root).resolve())
    if settings.model_dir is not None:
        env["ERC_MODEL_DIR"] = str(Path(settings.model_dir).resolve())
    return {"env_vars": env}


def _init(address: str) -> None:
    import ray

    kwargs: dict[str, Any] = {"runtime_env": _runtime_env(), "log_to_driver": True}
    if address == "local":
        # A Ray of this machine only, stopped with the run; a small object store: blocks are
        # chunks of dialogues, not tensors.
        kwargs.update(address="local", include_dashboard=False, object_store_memory=256 * 2**20)
    else:
        kwargs["address"] = address
    ray.init(**kwargs)


def _normalise(options: Options, fmt: str, folder: Path, errors: list[dict]) -> int:
    """Input -> Parquet files of one dialogue per row; returns the dialogues written."""
    pa = require_pyarrow("--ray")
    pq = pa.parquet
    folder.mkdir(parents=True, exist_ok=True)
    reader = open_reader(options.input, fmt, options.columns)
    written = 0
    for n, chunk in enumerate(chunks(reader.records(), options.chunk_utterances, options.chunk_dialogues)):
        good = [(r, r.dialogue) for r in chunk if r.dialogue is not None]
        bad = [r for r in chunk if r.dialogue is None]
        errors.extend(error_entry(r, r.error or "not readable", fmt) | {"_ordinal": r.ordinal} for r in bad)
        if not good:
            continue
        table = pa.table(
            {
                "ordinal": [r.ordinal for r, _ in good],
                "line": [r.line for r, _ in good],
                "dialogue_id": [output_id(r) for r, _ in good],
                "dialogue": [d.model_dump_json(exclude_none=True) for _, d in good],
            }
        )
        pq.write_table(table, folder / f"input-{n:06d}.parquet")
        written += len(good)
    return written


def _rows(path: Path) -> Iterator[tuple]:
    pq = require_pyarrow("--ray").parquet
    previous = None
    for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=4096):
        columns = [batch.column(c).to_pylist() for c in OUT_COLUMNS]
        for values in zip(*columns):
            key = (values[0], values[3])
            if previous is not None and key < previous:
                raise RuntimeError(f"{path}: rows out of input order; Ray Data did not preserve the order")
            previous = key
            yield values


def label_with_ray(
    options: Options, address: str, label_set: str | None, actors: int, actor_cpus: float, actor_gpus: float = 0.0
) -> Summary:
    import ray

    fmt = input_format(options.input, options.input_format)
    output_format(options.output)
    if (parts_dir(options.output) / "manifest.json").is_file():
        raise ResumeError(
            f"{parts_dir(options.output)} holds an unfinished run of another mode: resume it without --ray, "
            "or delete the folder"
        )
    if options.output.exists() and not options.overwrite:
        raise ResumeError(f"{options.output} exists: pass --overwrite to replace it")
    work = options.output.with_name(options.output.name + ".ray")
    shutil.rmtree(work, ignore_errors=True)
    began = time.monotonic()
    read_errors: list[dict] = []
    if _normalise(options, fmt, work / "input", read_errors) == 0 and not read_errors:
        raise InputError(f"{options.input} holds no dialogue")
    _init(address)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        if (work / "input").is_dir() and any((work / "input").iterdir()):
            ds = ray.data.read_parquet(str(work / "input"))
            ds = ds.map_batches(
                RayLabeller,
                fn_constructor_kwargs={"label_set": label_set},
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=actor_cpus,
                num_gpus=actor_gpus or None,
                batch_size=None,
                batch_format="pyarrow",
            )
            ds.write_parquet(str(work / "output"))
    finally:
        ray.shutdown()
    # The store only now: a Ray run that failed leaves no unfinished run to resume.
    store = Store(options.output, fingerprint(options, fmt), resume=False, overwrite=options.overwrite)
    summary = _merge(options, store, fmt, work, read_errors, label_set)
    shutil.rmtree(work, ignore_errors=True)
    summary.seconds = time.monotonic() - began
    return summary


def _merge(
    options: Options, store: Store, fmt: str, work: Path, read_errors: list[dict], label_set: str | None
) -> Summary:
    """The actors' files and the driver's errors, merged by input position, into the store in
    slices of whole dialogues (one slice in memory at a time)."""
    from service.labels import LABEL_SETS

    files = sorted((work / "output").glob("*.parquet")) if (work / "output").is_dir() else []
    where = "row" if fmt == "parquet" else "line"
    # The driver's errors as rows of the actors' shape: turn -1, the reason in the last column.
    driver = [
        (e["_ordinal"], e[where], e["dialogue_id"], -1, None, None, None, None, None, e["reason"]) for e in read_errors
    ]
    merged = heapq.merge(*(_rows(f) for f in files), iter(driver), key=lambda v: (v[0], v[3]))
    counts = {"dialogues": 0, "utterances": 0, "errors": 0}
    model, name = None, None
    rows, dialogues, current = Rows(), 0, None
    errors: list[dict[str, Any]] = []

    def commit(end: int) -> None:
        store.commit(rows, errors, end, dialogues)
        counts["dialogues"] += dialogues
        counts["utterances"] += len(rows)
        counts["errors"] += len(errors)

    for ordinal, line, dialogue_id, turn, speaker, label, scores, set_name, row_model, error in merged:
        if ordinal != current and current is not None and len(rows) + len(errors) >= options.chunk_utterances:
            commit(ordinal)
            rows, errors, dialogues = Rows(), [], 0
        current = ordinal
        if error is not None:
            errors.append({where: line, "dialogue_id": dialogue_id, "reason": error})
            continue
        if model is None:
            model, name = row_model, set_name
            store.check_model(model, LABEL_SETS[name])
        rows.add(dialogue_id, turn, speaker, label, json.loads(scores), set_name, row_model)
        dialogues += turn == 0
    if current is not None:
        commit(current + 1)
    name = name or label_set or "meld"
    store.finalize(LABEL_SETS[name])
    return Summary(
        mode="ray",
        model=model or "",
        label_set=name,
        dialogues=counts["dialogues"],
        utterances=counts["utterances"],
        errors=counts["errors"],
        seconds=0.0,
        load_seconds=0.0,
        output=str(options.output),
        errors_file=str(errors_path(options.output)) if counts["errors"] else None,
    )
