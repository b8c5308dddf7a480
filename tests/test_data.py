"""Readers: counts against each dataset's SOURCE.md, bad rows, typed form."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from service.data import (
    DataError,
    label_set_of,
    Dialogue,
    Turn,
    load_split,
    read_dailydialog,
    read_emorynlp_csv,
    read_meld_csv,
)
from service.labels import map_label
from tests.conftest import require


def _tables(source_md: Path) -> list[list[dict[str, str]]]:
    """Markdown tables of a SOURCE.md as lists of {header: cell}."""
    tables, rows, header = [], [], None
    for line in source_md.read_text(encoding="utf-8").splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-: "):
                rows.append(dict(zip(header, cells)))
        elif header is not None:
            tables.append(rows)
            rows, header = [], None
    return tables


def _counts_table(source_md: Path, first_column: str) -> dict[str, dict[str, str]]:
    for table in _tables(source_md):
        if table and first_column in table[0] and "utterances" in " ".join(table[0]):
            return {row[first_column]: row for row in table}
    raise AssertionError(f"no table starting with {first_column!r} in {source_md}")


def _distribution(cell: str) -> Counter:
    return Counter({name: int(n) for name, n in re.findall(r"(\w+) (\d+)", cell)})


def _check(
    dialogues: list[Dialogue], row: dict[str, str], dataset: str, dialogue_col: str, utt_col: str, dist_col: str
):
    assert len(dialogues) == int(row[dialogue_col])
    assert sum(len(d.turns) for d in dialogues) == int(row[utt_col])
    expected = Counter()
    for raw, n in _distribution(row[dist_col]).items():
        # The COSMIC tables already use InstructERC's names; the raw files use their own.
        expected[raw if raw in label_set_of(dataset) else map_label(dataset, raw)] += n
    assert Counter(t.label for d in dialogues for t in d.turns) == expected


SPLIT_NAMES = {"train": "train", "valid": "dev", "test": "test"}


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_meld_counts_match_source_md(data_dir, split):
    md = require(data_dir / "MELD" / "SOURCE.md", "MELD data")
    csv_rows = _counts_table(md, "split")
    cosmic = load_split(data_dir, "meld", split, "cosmic")
    csv = load_split(data_dir, "meld", split, "csv")
    # The same header "split" names both tables; the CSV one is keyed by file name.
    by_file = csv_rows.get(f"{SPLIT_NAMES[split]}_sent_emo.csv")
    assert by_file is not None
    _check(csv, by_file, "meld", "dialogues", "rows (=utterances)", "emotion distribution")
    pkl = {row["split"]: row for table in _tables(md) for row in table if "labels" in row}
    _check(cosmic, pkl[split], "meld", "dialogues", "utterances", "labels")
    # Same dialogues, same label sequences, whichever source (train ids coincide).
    assert [[t.label for t in d.turns] for d in cosmic] == [[t.label for t in d.turns] for d in csv]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_emorynlp_counts_match_source_md(data_dir, split):
    md = require(data_dir / "EmoryNLP" / "SOURCE.md", "EmoryNLP data")
    table = _counts_table(md, "file")
    csv = load_split(data_dir, "emorynlp", split, "csv")
    _check(
        csv,
        table[f"emorynlp_{SPLIT_NAMES[split]}_final.csv"],
        "emorynlp",
        "dialogues (scenes)",
        "utterances",
        "label distribution",
    )
    cosmic = load_split(data_dir, "emorynlp", split, "cosmic")
    _check(
        cosmic,
        table[f"EmoryNLP.pkl.json {split}"],
        "emorynlp",
        "dialogues (scenes)",
        "utterances",
        "label distribution",
    )
    by_id = {d.id: [t.label for t in d.turns] for d in csv}
    assert all(by_id[d.id] == [t.label for t in d.turns] for d in cosmic)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_iemocap_counts_match_source_md(data_dir, split):
    md = require(data_dir / "IEMOCAP" / "SOURCE.md", "IEMOCAP data")
    table = _counts_table(md, "split")
    _check(
        load_split(data_dir, "iemocap", split, "cosmic"),
        table[split],
        "iemocap",
        "dialogues",
        "utterances",
        "label distribution",
    )


@pytest.mark.parametrize(("split", "name"), [("valid", "dailydialog_dev.txt"), ("test", "dailydialog_test.txt")])
def test_dailydialog_counts_match_source_md_and_map_onto_meld(data_dir, split, name):
    md = require(data_dir / "DailyDialog" / "SOURCE.md", "DailyDialog data")
    table = _counts_table(md, "file")
    dialogues = load_split(data_dir, "dailydialog", split, "csv")
    _check(dialogues, table[name], "dailydialog", "dialogues", "utterances", "label distribution")
    assert {t.label for d in dialogues for t in d.turns} <= {
        "neutral",
        "surprise",
        "fear",
        "sad",
        "joyful",
        "disgust",
        "angry",
    }


def test_cosmic_speakers_are_fixed_indices(data_dir):
    require(data_dir / "IEMOCAP" / "iemocap.pkl.json", "IEMOCAP data")
    # InstructERC: M -> Speaker_0, anything else -> Speaker_1, whoever speaks first.
    first = load_split(data_dir, "iemocap", "train", "cosmic")[0]
    assert first.id == "Ses03F_impro06"
    assert first.speaker_indices()[:3] == (0, 1, 1)
    female_first = next(d for d in load_split(data_dir, "iemocap", "test", "cosmic") if d.speaker_ids[0] == 1)
    assert female_first.speaker_indices()[0] == 1


MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_meld_csv_reader_orders_turns_and_keeps_text(tmp_path):
    path = _write(
        tmp_path,
        "m.csv",
        MELD_HEADER
        + '2,"Je t’aime, ""chérie"" 😊",Ross,joy,positive,7,1,1,1,a,b\n'
        + "1,Hi,Rachel,neutral,neutral,7,0,1,1,a,b\n",
    )
    [dialogue] = read_meld_csv(path)
    assert dialogue == Dialogue(
        "7", (Turn("Rachel", "Hi", "neutral"), Turn("Ross", 'Je t’aime, "chérie" 😊', "joyful"))
    )


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("1,Hi,Rachel,,neutral,7,0,1,1,a,b\n", "missing label"),
        ("1,   ,Rachel,joy,neutral,7,0,1,1,a,b\n", "empty utterance"),
        ("1,Hi,Rachel,happy,neutral,7,0,1,1,a,b\n", "unknown meld label 'happy'"),
        ("1,Hi,Rachel,joy,neutral,x,0,1,1,a,b\n", "Dialogue_ID"),
    ],
)
def test_meld_bad_row_names_file_and_line(tmp_path, row, message):
    path = _write(tmp_path, "bad.csv", MELD_HEADER + "0,Fine,Rachel,neutral,neutral,7,0,1,1,a,b\n" + row)
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ".*" + re.escape(message)):
        read_meld_csv(path)


def test_emorynlp_bad_row_names_file_and_line(tmp_path):
    header = "Utterance,Speaker,Emotion,Scene_ID,Utterance_ID,Season,Episode,Start_Time,End_Time\n"
    path = _write(
        tmp_path, "e.csv", header + "Hi,['Monica Geller'],Joyful,1,1,1,2,a,b\nHo,['Joey'],Angry,1,2,1,2,a,b\n"
    )
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ".*unknown emorynlp label 'Angry'"):
        read_emorynlp_csv(path)
    good = _write(tmp_path, "g.csv", header + "Hi,\"['Monica Geller', 'Joey']\",Joyful,4,1,1,2,a,b\n")
    assert read_emorynlp_csv(good) == [Dialogue("1_2_4", (Turn("Monica Geller, Joey", "Hi", "Joyful"),))]


def test_dailydialog_bad_row_names_file_and_line(tmp_path):
    path = _write(tmp_path, "d.txt", "0\tHello\tneutral\n1\tHi\thappiness\n\n0\tYo\tjoy\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:4") + ".*unknown dailydialog label 'joy'"):
        read_dailydialog(path)


def test_missing_file_says_where_it_looked_and_how_to_supply(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/MELD/train_sent_emo.csv.*ERC_DATA_DIR.*erc data fetch"):
        load_split(tmp_path, "meld", "train", "csv")


def test_first_appearance_speaker_numbering():
    d = Dialogue("x", (Turn("Bob", "a"), Turn("Ann", "b"), Turn("Bob", "c"), Turn("Cy", "d")))
    assert d.speaker_indices() == (0, 1, 0, 2)
