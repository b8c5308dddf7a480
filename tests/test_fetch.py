import pytest

from service.data import DataError
from service.fetch import fetch_meld
from tests.conftest import require


def test_fetch_offline_fails_with_one_clear_line(tmp_path, monkeypatch):
    # Point the download at an address that refuses at once, as an offline machine does.
    monkeypatch.setattr("service.fetch.MELD_URL", "http://127.0.0.1:9/{name}")
    with pytest.raises(DataError) as info:
        fetch_meld(tmp_path, timeout=5)
    message = str(info.value)
    assert "\n" not in message
    assert "train_sent_emo.csv" in message and str(tmp_path / "MELD") in message
    assert "ERC_DATA_DIR" in message and "copy" in message
    assert not (tmp_path / "MELD" / "train_sent_emo.csv").exists()


def test_fetch_keeps_files_that_are_already_there(data_dir):
    require(data_dir / "MELD" / "train_sent_emo.csv", "MELD CSVs")
    # The shared data holds the exact pinned CSVs: nothing is downloaded.
    lines = fetch_meld(data_dir)
    assert len(lines) == 3 and all(line.startswith("present") for line in lines)
