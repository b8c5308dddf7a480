"""Device and precision choices (service/devices.py)."""

from __future__ import annotations

import pytest

from service import devices


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "avx512f"}, "float32"),  # this workplace's CPU of 2026-12-01: bf16 emulated
        ({"avx512f", "avx512_bf16"}, "bfloat16"),
        ({"avx512f", "amx_tile", "amx_bf16"}, "bfloat16"),
        (set(), "float32"),
    ],
)
def test_auto_dtype_follows_the_cpus_bf16_support(monkeypatch, flags, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "_cpu_flags", lambda: flags)
    assert devices.resolve_dtype("auto") == expected


def test_an_explicit_dtype_is_kept(monkeypatch):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: set())
    for dtype in ("bfloat16", "float16", "float32"):
        assert devices.resolve_dtype(dtype) == dtype


def test_cpu_flags_are_read_from_this_machine():
    flags = devices._cpu_flags()
    # Every x86_64 CPU this runs on has SSE2; elsewhere there may be no /proc/cpuinfo flags line.
    import platform

    if platform.machine() == "x86_64":
        assert "sse2" in flags
