"""Dataset readers: MELD, EmoryNLP, IEMOCAP and DailyDialog files into one typed form.

Every reader returns ``list[Dialogue]`` in the file's dialogue order. A bad row (missing or
unknown label, empty text, malformed field) raises :class:`DataError` naming the file and the
line (or, for JSON, the dialogue and turn): rows are never dropped silently.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from service.labels import DATASET_LABEL_SET, LABEL_SETS, UnknownLabelError, map_label

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
DATASETS = ("meld", "iemocap", "emorynlp", "dailydialog")
#: ``cosmic``: the InstructERC split JSON (``*.pkl.json``); ``csv``: the datasets' own files.
SOURCES = ("cosmic", "csv")


class DataError(ValueError):
    """A data file is missing or holds a bad row."""


@dataclass(frozen=True, slots=True)
class Turn:
    speaker: str
    text: str
    label: str | None = None


@dataclass(frozen=True, slots=True)
class Dialogue:
    id: str
    turns: tuple[Turn, ...]
    #: Fixed speaker indices (the COSMIC files fix them); ``None``: first appearance of the name.
    speaker_ids: tuple[int, ...] | None = field(default=None)

    def speaker_indices(self) -> tuple[int, ...]:
        """The ``N`` of ``Speaker_N`` for every turn."""
        if self.speaker_ids is not None:
            return self.speaker_ids
        return first_appearance_ids(t.speaker for t in self.turns)


def first_appearance_ids(names: Iterable[str]) -> tuple[int, ...]:
    """Number speakers ``0, 1, ...`` in order of first appearance."""
    seen: dict[str, int] = {}
    return tuple(seen.setdefault(name, len(seen)) for name in names)


# --- file layout -------------------------------------------------------------------------------

_COSMIC_FILES = {
    "meld": "MELD/meld.pkl.json",
    "iemocap": "IEMOCAP/iemocap.pkl.json",
    "emorynlp": "EmoryNLP/EmoryNLP.pkl.json",
}
_CSV_FILES: dict[str, dict[str, str]] = {
    "meld": {s: f"MELD/{n}_sent_emo.csv" for s, n in zip(SPLITS, ("train", "dev", "test"))},
    "emorynlp": {s: f"EmoryNLP/emorynlp_{n}_final.csv" for s, n in zip(SPLITS, ("train", "dev", "test"))},
    "dailydialog": {
        "valid": "DailyDialog/dailydialog_dev.txt",
        "test": "DailyDialog/dailydialog_test.txt",
    },
}


def data_file(data_dir: Path, dataset: str, source: str, split: Split) -> Path:
    """The file that holds ``dataset``'s ``split`` from ``source``."""
    if source == "cosmic" and dataset in _COSMIC_FILES:
        return data_dir / _COSMIC_FILES[dataset]
    if source == "csv" and dataset in _CSV_FILES and split in _CSV_FILES[dataset]:
        return data_dir / _CSV_FILES[dataset][split]
    raise DataError(f"no {source} source for {dataset} {split}")


def default_source(dataset: str) -> str:
    """The source a dataset is read from unless one is named: its own CSVs (MELD's can be
    fetched), except IEMOCAP, which exists only as InstructERC's ``*.pkl.json``."""
    return "cosmic" if dataset == "iemocap" else "csv"


def load_split(data_dir: Path, dataset: str, split: Split, source: str = "cosmic") -> list[Dialogue]:
    """Read one split of one dataset from ``data_dir`` (the folder named by ``ERC_DATA_DIR``)."""
    path = data_file(data_dir, dataset, source, split)
    if not path.is_file():
        hint = "run `erc data fetch`" if dataset == "meld" and source == "csv" else "copy it there"
        raise DataError(
            f"{dataset} {split} ({source}) needs {path}, which does not exist; "
            f"set ERC_DATA_DIR to the folder holding it or {hint}"
        )
    if source == "cosmic":
        return read_cosmic(path, dataset, split)
    if dataset == "meld":
        return read_meld_csv(path)
    if dataset == "emorynlp":
        return read_emorynlp_csv(path)
    return read_dailydialog(path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- readers -----------------------------------------------------------------------------------


def _checked_text(text: str | None, where: str) -> str:
    if text is None or not text.strip():
        raise DataError(f"{where}: empty utterance text")
    return text


def _checked_label(dataset: str, raw: str | None, where: str) -> str:
    if raw is None or not raw.strip():
        raise DataError(f"{where}: missing label")
    try:
        return map_label(dataset, raw)
    except UnknownLabelError as exc:
        raise DataError(f"{where}: {exc}") from None


def read_cosmic(path: Path, dataset: str, split: Split) -> list[Dialogue]:
    """Read a split of an InstructERC split JSON (``*.pkl.json``).

    Speakers keep the indices InstructERC renders: MELD and EmoryNLP store them, IEMOCAP maps
    ``M`` to ``Speaker_0`` and anything else to ``Speaker_1`` (as the official preprocessing does).
    """
    doc = json.loads(path.read_text(encoding="utf-8"))
    labels = LABEL_SETS[dataset]
    if tuple(doc.get("label_names", ())) != labels:
        raise DataError(f"{path}: label_names {doc.get('label_names')} differ from {labels}")
    dialogues = []
    for key in doc["splits"][split]:
        conv = doc["dialogues"][str(key)]
        lengths = {len(conv[f]) for f in ("speakers", "label_ids", "utterances")}
        if len(lengths) != 1:
            raise DataError(f"{path}: dialogue {key}: speakers, labels and utterances differ in length")
        speaker_ids, turns = [], []
        for n, (spk, label_id, text) in enumerate(zip(conv["speakers"], conv["label_ids"], conv["utterances"])):
            where = f"{path}: dialogue {key} turn {n}"
            if dataset == "iemocap":
                sid = 0 if spk == "M" else 1
            elif isinstance(spk, int) and spk >= 0:
                sid = spk
            else:
                raise DataError(f"{where}: speaker {spk!r} is not an index")
            if not isinstance(label_id, int) or not 0 <= label_id < len(labels):
                raise DataError(f"{where}: label id {label_id!r} outside 0..{len(labels) - 1}")
            speaker_ids.append(sid)
            turns.append(Turn(f"Speaker_{sid}", _checked_text(text, where), labels[label_id]))
        dialogues.append(Dialogue(str(key), tuple(turns), tuple(speaker_ids)))
    return dialogues


def _read_csv_rows(path: Path) -> Iterable[tuple[int, dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            # line_num is the physical line the row ends on (quoted fields may span lines).
            yield reader.line_num, row


def _group(rows: Sequence[tuple[str, int, Turn]]) -> list[Dialogue]:
    """Group ``(dialogue id, order key, turn)`` rows into dialogues in order of first appearance."""
    grouped: dict[str, list[tuple[int, Turn]]] = {}
    for dialogue_id, order, turn in rows:
        grouped.setdefault(dialogue_id, []).append((order, turn))
    return [
        Dialogue(did, tuple(t for _, t in sorted(items, key=lambda item: item[0]))) for did, items in grouped.items()
    ]


def _int_field(row: dict[str, str], name: str, where: str) -> int:
    try:
        return int(row[name])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{where}: field {name!r} is not an integer: {row.get(name)!r}") from None


def _csv_turn(dataset: str, row: dict[str, str], speaker: str, where: str) -> Turn:
    if not speaker:
        raise DataError(f"{where}: missing speaker")
    return Turn(speaker, _checked_text(row.get("Utterance"), where), _checked_label(dataset, row.get("Emotion"), where))


def read_meld_csv(path: Path) -> list[Dialogue]:
    """Read an official MELD CSV (``*_sent_emo.csv``); dialogue ids are ``Dialogue_ID``."""
    rows = []
    for line, row in _read_csv_rows(path):
        where = f"{path}:{line}"
        dialogue_id = str(_int_field(row, "Dialogue_ID", where))
        turn = _csv_turn("meld", row, (row.get("Speaker") or "").strip(), where)
        rows.append((dialogue_id, _int_field(row, "Utterance_ID", where), turn))
    return _group(rows)


def read_emorynlp_csv(path: Path) -> list[Dialogue]:
    """Read an EmoryNLP CSV; dialogue ids are ``Season_Episode_SceneID`` as in the COSMIC JSON."""
    rows = []
    for line, row in _read_csv_rows(path):
        where = f"{path}:{line}"
        dialogue_id = "_".join(str(_int_field(row, name, where)) for name in ("Season", "Episode", "Scene_ID"))
        # Speakers are Python-list strings such as "['Monica Geller']".
        try:
            names = ast.literal_eval(row.get("Speaker") or "")
            speaker = ", ".join(str(n) for n in names) if isinstance(names, list) else str(names)
        except (ValueError, SyntaxError):
            speaker = (row.get("Speaker") or "").strip()
        turn = _csv_turn("emorynlp", row, speaker, where)
        rows.append((dialogue_id, _int_field(row, "Utterance_ID", where), turn))
    return _group(rows)


def read_dailydialog(path: Path) -> list[Dialogue]:
    """Read a DailyDialog TSV (``speaker<TAB>utterance<TAB>emotion``, blank line between
    dialogues); labels are mapped onto MELD's, dialogue ids are ``dd<n>`` in file order."""
    dialogues: list[Dialogue] = []
    turns: list[Turn] = []
    speaker_ids: list[int] = []

    def close() -> None:
        if turns:
            dialogues.append(Dialogue(f"dd{len(dialogues)}", tuple(turns), tuple(speaker_ids)))
            turns.clear()
            speaker_ids.clear()

    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                close()
                continue
            where = f"{path}:{line_no}"
            parts = line.split("\t")
            if len(parts) != 3:
                raise DataError(f"{where}: expected 3 tab-separated fields, found {len(parts)}")
            try:
                sid = int(parts[0])
            except ValueError:
                raise DataError(f"{where}: speaker {parts[0]!r} is not an index") from None
            speaker_ids.append(sid)
            turns.append(
                Turn(
                    f"Speaker_{sid}",
                    _checked_text(parts[1], where),
                    _checked_label("dailydialog", parts[2], where),
                )
            )
    close()
    return dialogues


def label_set_of(dataset: str) -> tuple[str, ...]:
    """The label set a dataset's mapped labels belong to (DailyDialog: MELD's)."""
    return LABEL_SETS[DATASET_LABEL_SET[dataset]]
