"""Where a measured figure comes from: the code's commit and the machine, for reports."""

from __future__ import annotations

import os
import platform
import subprocess


def commit() -> str | None:
    """The checkout's short commit, with "-dirty" when tracked files have uncommitted changes
    (the figures then belong to no commit); None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"
