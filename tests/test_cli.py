"""The `erc` command as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import require


def erc(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_prompt_prints_exactly_the_reference(data_dir):
    ref = json.loads(
        (require(data_dir / "reference_prompts" / "meld_window12_test_official_sample.jsonl", "reference"))
        .read_text()
        .splitlines()[1]
    )
    # line 1 is the second utterance of the first MELD test dialogue (key 1153).
    out = erc(
        "prompt",
        "--dataset",
        "meld",
        "--source",
        "cosmic",
        "--split",
        "test",
        "--dialogue",
        "1153",
        "--turn",
        "1",
        "--no-demonstrations",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == ref["input"] + "\n"


def test_prompt_tasks_and_errors(data_dir):
    require(data_dir / "MELD" / "meld.pkl.json", "MELD data")
    base = ["prompt", "--dataset", "meld", "--split", "test", "--dialogue", "1153", "--no-demonstrations"]
    speaker = erc(*base, "--turn", "1", "--task", "speaker")
    assert speaker.stdout.startswith("Now you are expert") and "Please select the Speaker label" in speaker.stdout
    prediction = erc(*base, "--turn", "1", "--task", "prediction")
    assert prediction.stdout.count("***") == 1 and "next utterance is spoken by <1>" in prediction.stdout
    bad = erc(*base, "--turn", "99")
    assert bad.returncode == 1 and bad.stdout == "" and "--turn 99 outside" in bad.stderr
    missing = erc(*base[:-3], "--dialogue", "nope", "--turn", "0")
    assert missing.returncode == 1 and "no dialogue 'nope'" in missing.stderr


def test_prompt_with_demonstrations_uses_the_index(data_dir, meld_index):
    out = erc("prompt", "--dataset", "meld", "--split", "train", "--dialogue", "0", "--turn", "0", "--k", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("Similar utterances from other conversations: ") == 1
    # The first train utterance is in the pool; its own dialogue must not be shown.
    own = {p.text for p in meld_index.pool if p.dialogue_id == "0"}
    section = out.stdout.split("Similar utterances from other conversations: ")[1].split("Please select")[0]
    assert not any(f'"{t}" is' in section for t in own)


def test_retrieval_baseline_beats_majority(data_dir, meld_index, tmp_path):
    report = tmp_path / "baseline.json"
    out = erc("baseline", "--dataset", "meld", "--split", "test", "--k", "10", "--output", str(report))
    assert out.returncode == 0, out.stderr
    figures = json.loads(report.read_text())
    assert figures["count"] == 2610
    assert figures["majority_weighted_f1"] == pytest.approx(31.3, abs=0.1)
    # Measured here: 50.96 at k=10; the band guards against a broken index or vote.
    assert 48 <= figures["weighted_f1"] <= 54
    assert f"weighted_f1: {figures['weighted_f1']}" in out.stdout


def test_index_ensure_keeps_built_indexes_and_says_what_it_skips(settings, data_dir, tmp_path):
    """`make serve`/`make test` run `erc index ensure`: one index per label set whose training
    data is present; an absent dataset is skipped with a message naming the file."""
    index_root, data = tmp_path / "index", tmp_path / "data"
    index_root.mkdir()
    data.mkdir()
    for name in ("meld", "emorynlp"):
        (index_root / name).symlink_to(require(settings.index_root / name, f"erc index build --dataset {name}"))
    out = erc("index", "ensure", env={"ERC_INDEX_ROOT": str(index_root), "ERC_DATA_DIR": str(data)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("present") and lines[0].endswith("meld")
    assert lines[1].startswith("skipped") and "iemocap" in lines[1] and "iemocap.pkl.json is missing" in lines[1]
    assert "will not be served" in lines[1] and lines[2].startswith("present")
    assert not (index_root / "iemocap").exists()
