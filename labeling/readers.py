"""Streaming readers: an input file -> one :class:`Record` per dialogue, in input order.

JSONL holds one dialogue per line in the API's own shape (``{"id"?, "turns": [{"speaker",
"text"}]}``); CSV and Parquet hold one utterance per row, in columns named by :class:`Columns`
(MELD's own names by default). A dialogue's rows must be contiguous: the readers hold one
dialogue at a time, never the file. Rows of a dialogue that reappear after another dialogue
began are not joined to their earlier rows (that would need the whole file in memory): they
become an error record naming both lines, and are not labelled. To tell, the readers keep one
hash per dialogue id seen (about 100 bytes a dialogue).

A record that cannot be labelled (invalid JSON, a wrong shape, an empty text, a row without its
dialogue id) carries the reason instead of a dialogue; the run writes it to the errors file and
goes on. Limits that are settings (``ERC_MAX_TURNS`` ...) are checked where the labelling
happens, by the service's own checks.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.schemas import DialogueIn

#: Input formats by file suffix.
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
#: Validation errors named per record; the rest are counted.
MAX_REASONS = 3


class InputError(ValueError):
    """The input cannot be read at all (a missing column, an unknown format): the run stops."""


@dataclass(frozen=True)
class Columns:
    """Column names of an utterance-per-row input. ``order`` sorts a dialogue's rows (integers);
    None keeps the file's order. The defaults are MELD's CSV columns."""

    dialogue_id: str = "Dialogue_ID"
    order: str | None = "Utterance_ID"
    speaker: str = "Speaker"
    text: str = "Utterance"


@dataclass(slots=True)
class Record:
    """One dialogue of the input: ``ordinal`` counts dialogues from 0 in input order (bad ones
    included), ``line`` is where it starts (JSONL and CSV: the file's 1-based line; Parquet: the
    1-based row). Exactly one of ``dialogue`` and ``error`` is set."""

    ordinal: int
    line: int
    dialogue_id: str | None
    dialogue: DialogueIn | None = None
    error: str | None = None

    @property
    def utterances(self) -> int:
        return len(self.dialogue.turns) if self.dialogue is not None else 0


def input_format(path: Path, override: str | None = None) -> str:
    if override:
        return override
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"cannot tell the format of {path} from its suffix: name it .jsonl, .csv or .parquet, "
            "or pass --input-format"
        )
    return fmt


def describe(exc: ValidationError, where: dict[int, int] | None = None) -> str:
    """A validation error as one line: each field's location and message; ``where`` maps a turn
    index to its input line."""
    errors = exc.errors(include_url=False, include_input=False)
    parts = []
    for e in errors[:MAX_REASONS]:
        loc = list(e["loc"])
        if e["type"] == "json_invalid":
            parts.append(f"invalid JSON: {e['msg']}")
            continue
        at = ""
        if where is not None and len(loc) >= 2 and loc[0] == "turns" and isinstance(loc[1], int) and loc[1] in where:
            at = f" (line {where[loc[1]]})"
        parts.append(f"{'.'.join(str(x) for x in loc) or 'record'}{at}: {e['msg']}")
    if len(errors) > MAX_REASONS:
        parts.append(f"and {len(errors) - MAX_REASONS} more")
    return "; ".join(parts)


class Reader:
    """Base of the readers: ``records(start)`` yields every dialogue from ordinal ``start`` on
    (earlier ones are read but not validated: what ``--resume`` skips), and ``fraction()`` says
    how much of the input has been consumed (for the progress bar's time left)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = max(1, os.path.getsize(path))
        self.consumed = 0
        #: Utterances in the whole input when the format says so up front (Parquet's row count).
        self.total_utterances: int | None = None

    def fraction(self) -> float:
        return min(1.0, self.consumed / self.size)

    def records(self, start: int = 0) -> Iterator[Record]:
        raise NotImplementedError


class JsonlReader(Reader):
    def records(self, start: int = 0) -> Iterator[Record]:
        ordinal = 0
        with self.path.open("rb") as fh:
            for line, raw in enumerate(fh, 1):
                self.consumed += len(raw)
                if not raw.strip():
                    continue
                if ordinal < start:
                    ordinal += 1
                    continue
                try:
                    dialogue = DialogueIn.model_validate_json(raw)
                except ValidationError as exc:
                    yield Record(ordinal, line, None, error=describe(exc))
                else:
                    yield Record(ordinal, line, dialogue.id, dialogue)
                ordinal += 1


@dataclass(slots=True)
class _Row:
    line: int
    dialogue_id: str | None
    order: Any
    speaker: Any
    text: Any


class _Grouper:
    """Contiguous rows of one dialogue -> one :class:`Record`."""

    def __init__(self, columns: Columns) -> None:
        self.columns = columns
        self.seen: set[int] = set()
        self.first_line: dict[int, int] = {}

    def group(self, rows: Iterable[_Row], start: int) -> Iterator[Record]:
        for ordinal, (dialogue_id, run) in enumerate(_runs(rows)):
            if dialogue_id is None:
                if ordinal >= start:
                    reason = f"{self.columns.dialogue_id}: the row has no dialogue id"
                    yield Record(ordinal, run[0].line, None, error=reason)
                continue
            record = self._record(ordinal, dialogue_id, run, start)
            if record is not None:
                yield record

    def _record(self, ordinal: int, dialogue_id: str, rows: list[_Row], start: int) -> Record | None:
        key = hash(dialogue_id)
        if key in self.seen:
            reason = (
                f"rows of dialogue {dialogue_id!r} are not contiguous: they reappear at line {rows[0].line} after "
                f"other dialogues (its earlier rows start at line {self.first_line.get(key, '?')}); "
                "these rows were not labelled: sort the input by its dialogue id"
            )
            return Record(ordinal, rows[0].line, dialogue_id, error=reason) if ordinal >= start else None
        self.seen.add(key)
        if len(self.first_line) < 100_000:
            # Only for the message above; bounded, so memory stays flat on any corpus.
            self.first_line[key] = rows[0].line
        if ordinal < start:
            return None
        return self._validated(ordinal, dialogue_id, rows)

    def _validated(self, ordinal: int, dialogue_id: str, rows: list[_Row]) -> Record:
        if self.columns.order is not None:
            try:
                rows = sorted(rows, key=lambda r: int(r.order))
            except (TypeError, ValueError):
                bad = next(r for r in rows if not _is_int(r.order))
                return Record(
                    ordinal,
                    rows[0].line,
                    dialogue_id,
                    error=f"{self.columns.order} (line {bad.line}): {bad.order!r} is not an integer",
                )
        where = {i: r.line for i, r in enumerate(rows)}
        try:
            dialogue = DialogueIn.model_validate(
                {"id": dialogue_id, "turns": [{"speaker": r.speaker, "text": r.text} for r in rows]}
            )
        except ValidationError as exc:
            return Record(ordinal, min(r.line for r in rows), dialogue_id, error=describe(exc, where))
        return Record(ordinal, min(r.line for r in rows), dialogue_id, dialogue)


def _runs(rows: Iterable[_Row]) -> Iterator[tuple[str | None, list[_Row]]]:
    """Consecutive rows of one dialogue id; a row without an id is a run of its own."""
    current: str | None = None
    held: list[_Row] = []
    for row in rows:
        if held and (row.dialogue_id != current or not row.dialogue_id):
            yield current, held
            held = []
        current = row.dialogue_id or None
        held.append(row)
    if held:
        yield current, held


def _is_int(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True


class CsvReader(Reader):
    def __init__(self, path: Path, columns: Columns) -> None:
        super().__init__(path)
        self.columns = columns
        self._raw: Any = None

    def fraction(self) -> float:
        # The byte offset read so far (ahead of the rows parsed by at most one read buffer).
        if self._raw is None or self._raw.closed:
            return 1.0 if self._raw is not None else 0.0
        return min(1.0, self._raw.tell() / self.size)

    def records(self, start: int = 0) -> Iterator[Record]:
        c = self.columns
        with self.path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
            self._raw = fh.buffer
            reader = csv.reader(fh)
            header = next(reader, [])
            wanted = {"--id-column": c.dialogue_id, "--speaker-column": c.speaker, "--text-column": c.text}
            if c.order is not None:
                wanted["--order-column"] = c.order
            for flag, name in wanted.items():
                if name not in header:
                    raise InputError(f"{self.path} has no column {name!r} ({flag}); its columns: {', '.join(header)}")
            i_id, i_speaker, i_text = header.index(c.dialogue_id), header.index(c.speaker), header.index(c.text)
            i_order = header.index(c.order) if c.order is not None else None
            width = max(i_id, i_speaker, i_text, i_order or 0) + 1

            def rows() -> Iterator[_Row]:
                for row in reader:
                    if len(row) < width:
                        row = row + [""] * (width - len(row))
                    order = row[i_order] if i_order is not None else None
                    # line_num is the physical line the row ends on (a quoted field may span lines).
                    yield _Row(reader.line_num, row[i_id].strip(), order, row[i_speaker], row[i_text])

            for record in _Grouper(c).group(rows(), start):
                if record is not None:
                    yield record


class ParquetReader(Reader):
    def __init__(self, path: Path, columns: Columns, batch_rows: int = 8192) -> None:
        super().__init__(path)
        self.columns = columns
        self.batch_rows = batch_rows
        from labeling.store import require_pyarrow

        pq = require_pyarrow("Parquet input").parquet
        self._file = pq.ParquetFile(str(path))
        self.total_utterances = self._file.metadata.num_rows

    def fraction(self) -> float:
        return min(1.0, self.consumed / max(1, self.total_utterances or 1))

    def records(self, start: int = 0) -> Iterator[Record]:
        c = self.columns
        names = [c.dialogue_id, c.speaker, c.text] + ([c.order] if c.order else [])
        have = self._file.schema_arrow.names
        for name in names:
            if name not in have:
                raise InputError(f"{self.path} has no column {name!r}; its columns: {', '.join(have)}")

        def rows() -> Iterator[_Row]:
            line = 0
            for batch in self._file.iter_batches(batch_size=self.batch_rows, columns=names):
                ids, speakers, texts = (batch.column(n).to_pylist() for n in names[:3])
                orders = batch.column(c.order).to_pylist() if c.order else [None] * len(ids)
                for did, speaker, text, order in zip(ids, speakers, texts, orders):
                    line += 1
                    self.consumed = line
                    yield _Row(line, None if did is None else str(did), order, speaker, text)

        for record in _Grouper(c).group(rows(), start):
            if record is not None:
                yield record


def open_reader(path: Path, fmt: str, columns: Columns) -> Reader:
    if fmt == "jsonl":
        return JsonlReader(path)
    if fmt == "csv":
        return CsvReader(path, columns)
    if fmt == "parquet":
        return ParquetReader(path, columns)
    raise InputError(f"unknown input format {fmt!r}: jsonl, csv or parquet")


def chunks(records: Iterable[Record], max_utterances: int, max_dialogues: int) -> Iterator[list[Record]]:
    """Consecutive records, cut once a chunk holds ``max_utterances`` utterances or
    ``max_dialogues`` dialogues (a dialogue is never split)."""
    held: list[Record] = []
    utterances = 0
    for record in records:
        held.append(record)
        utterances += record.utterances
        if utterances >= max_utterances or len(held) >= max_dialogues:
            yield held
            held, utterances = [], 0
    if held:
        yield held
