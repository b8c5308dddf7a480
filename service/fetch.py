"""`erc data fetch`: download the public MELD CSVs (the only dataset files we may fetch)."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from service.data import DataError, sha256_file

#: declare-lab/MELD at the commit our data README records; checksums pin the exact bytes.
MELD_COMMIT = "2d2011b409d3ca2d7e94460cd007d434b1d0a102"
MELD_URL = f"https://raw.githubusercontent.com/declare-lab/MELD/{MELD_COMMIT}/data/MELD/{{name}}"
MELD_FILES = {
    "train_sent_emo.csv": "d2fa2d6529cf03cac2989efec05c9b27d8fd2f4c8fc5974c7ae88aa537fa02db",
    "dev_sent_emo.csv": "2e89c6f8aa182d6f62f8c6331aece905ac7273ca4999660bfb5213e1d0370c1c",
    "test_sent_emo.csv": "8d37103938f7067600839fe29d5a114a6cd1bcdafb75bec101e06464c5006888",
}


def fetch_meld(data_dir: Path, timeout: float = 30.0) -> list[str]:
    """Make sure ``data_dir/MELD`` holds the three official MELD CSVs, downloading what is
    missing. Returns one status line per file; raises :class:`DataError` with one clear line
    when a file can be neither found nor downloaded."""
    folder = data_dir / "MELD"
    status = []
    for name, checksum in MELD_FILES.items():
        path = folder / name
        if path.is_file() and sha256_file(path) == checksum:
            status.append(f"present  {path}")
            continue
        url = MELD_URL.format(name=name)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                payload = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DataError(
                f"MELD file {name} is missing from {folder} and could not be downloaded from "
                f"{url} ({reason}); copy the MELD CSVs into {folder} or set ERC_DATA_DIR to a "
                "folder that has MELD/"
            ) from None
        got = hashlib.sha256(payload).hexdigest()
        if got != checksum:
            raise DataError(f"downloaded {url} has sha256 {got}, expected {checksum}; not saved")
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(payload)
        tmp.rename(path)
        status.append(f"fetched  {path}")
    return status
