"""Crash-safe output: one part file per chunk, renamed into place, and a manifest.

While a run goes on, its output lives in ``OUTPUT.parts/``: ``part-NNNNNN.jsonl`` (or
``.parquet``) and ``errors-NNNNNN.jsonl`` per chunk, each written to a temporary name, fsynced
and renamed (a rename is atomic: a file is either whole or absent), then ``manifest.json``, the
commit record, is replaced the same way. The manifest says which chunks are committed and from
which input dialogue the next chunk starts; a part file the manifest does not list (a crash
between the two renames) is ignored and rewritten. So a crash, SIGKILL or Ctrl-C loses at most
the chunks in flight and never leaves a torn file, and ``--resume`` starts after the last
committed chunk. When the input is done, the parts are concatenated into ``OUTPUT`` (and the
errors into ``OUTPUT.errors.jsonl``) under temporary names and renamed into place, and the
folder is removed: the final ``OUTPUT`` is one file, as asked.

The manifest is small and constant in size (totals, not a list of chunks): rewriting it per
chunk costs the same on any corpus.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labeling.readers import InputError

#: Output formats by suffix.
OUTPUT_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
MANIFEST_VERSION = 1
#: Output columns, in order.
COLUMNS = ("dialogue_id", "turn", "speaker", "label", "scores", "label_set", "model")


def require_pyarrow(what: str) -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError(f"{what} needs pyarrow: pip install 'instructerc-service[ray]' (or pyarrow)") from None
    return pyarrow


def output_format(path: Path) -> str:
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"OUTPUT {path} must end in .jsonl or .parquet (the output's format)")
    return fmt


def errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """``write(binary file)`` into a temporary sibling, fsync, rename over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class Rows:
    """One chunk's output rows, by column."""

    dialogue_id: list[str] = field(default_factory=list)
    turn: list[int] = field(default_factory=list)
    speaker: list[str] = field(default_factory=list)
    label: list[str] = field(default_factory=list)
    scores: list[dict[str, float]] = field(default_factory=list)
    label_set: list[str] = field(default_factory=list)
    model: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.turn)

    def add(self, dialogue_id: str, turn: int, speaker: str, label: str, scores: dict, label_set: str, model: str):
        self.dialogue_id.append(dialogue_id)
        self.turn.append(turn)
        self.speaker.append(speaker)
        self.label.append(label)
        self.scores.append(scores)
        self.label_set.append(label_set)
        self.model.append(model)

    def jsonl(self) -> bytes:
        columns = [getattr(self, c) for c in COLUMNS]
        return "".join(
            json.dumps(dict(zip(COLUMNS, values)), ensure_ascii=False) + "\n" for values in zip(*columns)
        ).encode()

    def arrow(self, labels: Sequence[str]) -> Any:
        pa = require_pyarrow("Parquet output")
        return pa.table({c: getattr(self, c) for c in COLUMNS}, schema=arrow_schema(labels))


def arrow_schema(labels: Sequence[str]) -> Any:
    """Parquet's schema: the scores as a struct with one float64 field per label, in the label
    set's order."""
    pa = require_pyarrow("Parquet output")
    return pa.schema(
        [
            ("dialogue_id", pa.string()),
            ("turn", pa.int32()),
            ("speaker", pa.string()),
            ("label", pa.string()),
            ("scores", pa.struct([(label, pa.float64()) for label in labels])),
            ("label_set", pa.string()),
            ("model", pa.string()),
        ]
    )


class ResumeError(InputError):
    """``--resume`` cannot continue what is there (or a fresh run would overwrite it)."""


class Store:
    """The parts folder and its manifest (see the module's docstring)."""

    def __init__(self, output: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        self.output = output
        self.format = output_format(output)
        self.dir = parts_dir(output)
        self.manifest_path = self.dir / "manifest.json"
        self.fingerprint = fingerprint
        if self.manifest_path.is_file():
            if not resume:
                raise ResumeError(
                    f"{self.dir} holds an unfinished run: pass --resume to continue it, or delete the folder"
                )
            self.state = json.loads(self.manifest_path.read_text())
            before = self.state["fingerprint"]
            changed = [k for k, v in fingerprint.items() if before.get(k) != v]
            if changed:
                was = ", ".join(f"{k}={before.get(k)!r}" for k in changed)
                raise ResumeError(
                    f"cannot resume {self.dir}: {', '.join(changed)} differ from the interrupted run's ({was})"
                )
        else:
            if output.exists() and not overwrite:
                what = "is complete: nothing to resume" if resume else "exists: pass --overwrite to replace it"
                raise ResumeError(f"{output} {what}")
            self.dir.mkdir(parents=True, exist_ok=True)
            self.state = {
                "version": MANIFEST_VERSION,
                "fingerprint": fingerprint,
                "next_chunk": 0,
                "next_ordinal": 0,
                "dialogues": 0,
                "utterances": 0,
                "errors": 0,
                "model": None,
                "labels": None,
                "complete": False,
            }
            self._write_manifest()
        # Parts no committed chunk owns: left by a crash between a part's rename and the manifest's.
        for stray in self.dir.iterdir():
            if stray.name.endswith(".tmp") or (
                stray.name.startswith(("part-", "errors-")) and self._index(stray) >= self.state["next_chunk"]
            ):
                stray.unlink()

    @staticmethod
    def _index(path: Path) -> int:
        try:
            return int(path.name.split("-")[1].split(".")[0])
        except (IndexError, ValueError):
            return -1

    @property
    def next_ordinal(self) -> int:
        return self.state["next_ordinal"]

    def _part(self, index: int) -> Path:
        return self.dir / f"part-{index:06d}.{self.format}"

    def _errors(self, index: int) -> Path:
        return self.dir / f"errors-{index:06d}.jsonl"

    def _write_manifest(self) -> None:
        atomic_write(self.manifest_path, lambda fh: fh.write(json.dumps(self.state, indent=1).encode()))

    def check_model(self, model: str, labels: Sequence[str]) -> None:
        """A resumed run must label with the model and label set that began it."""
        if self.state["model"] not in (None, model) or self.state["labels"] not in (None, list(labels)):
            raise ResumeError(
                f"cannot resume {self.dir}: it was labelled by {self.state['model']} "
                f"({', '.join(self.state['labels'] or [])}), this run serves {model} ({', '.join(labels)})"
            )
        self.state["model"], self.state["labels"] = model, list(labels)

    def commit(self, rows: Rows, errors: Sequence[dict], end_ordinal: int, dialogues: int) -> None:
        """Write one chunk's parts, then the manifest that commits them."""
        index = self.state["next_chunk"]
        if self.format == "jsonl":
            atomic_write(self._part(index), lambda fh: fh.write(rows.jsonl()))
        else:
            pq = require_pyarrow("Parquet output").parquet
            table = rows.arrow(self.state["labels"])
            atomic_write(self._part(index), lambda fh: pq.write_table(table, fh))
        if errors:
            body = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors).encode()
            atomic_write(self._errors(index), lambda fh: fh.write(body))
        self.state.update(
            next_chunk=index + 1,
            next_ordinal=end_ordinal,
            dialogues=self.state["dialogues"] + dialogues,
            utterances=self.state["utterances"] + len(rows),
            errors=self.state["errors"] + len(errors),
        )
        self._write_manifest()

    @property
    def committed(self) -> int:
        """Chunks committed so far (by this run and the runs it resumes)."""
        return self.state["next_chunk"]

    def discard_if_empty(self) -> None:
        if self.committed == 0 and self.dir.is_dir():
            shutil.rmtree(self.dir)

    def finalize(self, labels: Sequence[str]) -> None:
        """Concatenate the parts into OUTPUT (and the errors file), then remove the folder."""
        self.state["complete"] = True
        self._write_manifest()
        n = self.state["next_chunk"]
        if self.format == "jsonl":

            def write(fh) -> None:
                for i in range(n):
                    with self._part(i).open("rb") as part:
                        shutil.copyfileobj(part, fh)

        else:
            pq = require_pyarrow("Parquet output").parquet
            schema = arrow_schema(self.state["labels"] or labels)

            def write(fh) -> None:
                # One part in memory at a time; each part becomes a row group.
                with pq.ParquetWriter(fh, schema) as writer:
                    for i in range(n):
                        writer.write_table(pq.read_table(self._part(i), schema=schema))

        atomic_write(self.output, write)
        errors = errors_path(self.output)
        if self.state["errors"]:

            def write_errors(fh) -> None:
                for i in range(n):
                    if self._errors(i).is_file():
                        with self._errors(i).open("rb") as part:
                            shutil.copyfileobj(part, fh)

            atomic_write(errors, write_errors)
        elif errors.exists():
            errors.unlink()  # an earlier run's, which --overwrite replaced
        shutil.rmtree(self.dir)
