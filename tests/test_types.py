"""The serving runtime type-checks: mypy (pinned in the dev extra, configured in pyproject.toml)
on every module tests/test_boundary.py finds the runtime made of."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_boundary import ROOT, module_file, runtime_modules


def _mypy(*files: Path | str) -> subprocess.CompletedProcess[str]:
    # The cache lives with pytest's (ignored by git); a cold run checks the runtime in seconds.
    cache = ROOT / ".pytest_cache" / "mypy"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(cache),
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_the_serving_runtime_type_checks():
    files = sorted(str(module_file(name)) for name in runtime_modules())
    assert any(f.endswith("predictor.py") for f in files) and any(f.endswith("exceptions.py") for f in files)
    out = _mypy(*files)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_configuration_still_reports_a_type_error(tmp_path):
    """Not vacuous: with the project's settings, a wrong type in code like the runtime's fails."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from service.exceptions import LimitError\n\n\ndef f() -> None:\n    raise LimitError(3, ['dialogue'])\n"
    )
    out = _mypy(bad)
    assert out.returncode == 1 and 'Argument 1 to "LimitError" has incompatible type "int"' in out.stdout
