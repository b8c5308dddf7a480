"""Resolving a device setting ("auto", "cpu", "cuda[:N]") to what torch should use."""

from __future__ import annotations


def resolve(device: str) -> str:
    """``auto``: the GPU when torch sees one, else the CPU; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: CPU features that compute bfloat16 natively (AMX tiles, or AVX-512 BF16 dot products).
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 where the hardware computes it natively (a GPU that supports it, a CPU
    with AMX or AVX-512 BF16), else float32; anything else as given. Without those CPU features
    bfloat16 is emulated, several times slower than float32, while a CPU with AMX computes
    bfloat16 faster than float32: a fixed default would be wrong on one of them (the figures:
    docs/performance.md)."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if _cpu_flags() & BF16_CPU_FLAGS else "float32"
