"""Resolving a device setting ("auto", "cpu", "cuda[:N]") to what torch should use."""

from __future__ import annotations


def resolve(device: str) -> str:
    """``auto``: the GPU when torch sees one, else the CPU; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
