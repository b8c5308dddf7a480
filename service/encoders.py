"""Runtimes for the retrieval encoder (all-MiniLM-L6-v2): PyTorch through sentence-transformers,
or an export of the same weights run by ONNX Runtime (fp32 ``onnx``, or ``onnx-int8``: its
weights dynamically quantized to int8) or OpenVINO (fp32).

The exports are made at set-up from the shipped weights (``erc weights build`` writes
``weights/encoder-<backend>/``; never downloaded, never committed) and hold the whole
sentence-transformers pipeline after tokenisation: the transformer, mean pooling over the attention
mask and L2 normalisation, so a backend returns what ``SentenceTransformer.encode(...,
normalize_embeddings=True)`` returns (the fp32 ones within float rounding, the int8 one within
quantization error: tests/test_encoders.py). The tokenizer is the model folder's own, with the
folder's ``max_seq_length``. Indexes are built by torch in fp32 whatever the serving backend.

sentence-transformers' own ``backend="onnx"|"openvino"`` needs optimum-onnx / optimum-intel, which
pin transformers below the 5.x that vLLM 0.32 needs; the export here is the same idea without them
(``torch.onnx.export`` / ``openvino.convert_model``).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("service.encoders")

BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")
EXPORT_MANIFEST = "encoder.json"
EXPORT_VERSION = 1
_FILES = {"onnx": "model.onnx", "onnx-int8": "model.onnx", "openvino": "openvino_model.xml"}
#: What each backend needs installed, and the extra of pyproject.toml that installs it.
_RUNTIME = {
    "onnx": ("onnxruntime", "onnx"),
    "onnx-int8": ("onnxruntime", "onnx"),
    "openvino": ("openvino", "openvino"),
}
PRECISION = {"onnx": "fp32", "onnx-int8": "int8", "openvino": "fp32"}
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class EncoderBackendError(RuntimeError):
    """A backend cannot be used: its runtime is not installed or its export is missing or stale."""


def export_dir(weights_root: Path, backend: str) -> Path:
    return weights_root / f"encoder-{backend}"


def _max_seq_length(folder: Path) -> int:
    config = folder / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    return 512


def _require_runtime(backend: str) -> None:
    module, extra = _RUNTIME[backend]
    try:
        __import__(module)
    except ImportError:
        raise EncoderBackendError(
            f"the {backend} encoder backend needs {module}: pip install -e '.[{extra}]' (make setup installs onnx)"
        ) from None


def check_export(folder: Path, backend: str, source: dict[str, Any]) -> dict[str, Any]:
    """The export's manifest, after checking it is complete and was made from ``source`` (the
    torch encoder's identity); raises :class:`EncoderBackendError` saying how to rebuild it."""
    command = f"ERC_ENCODER_BACKEND={backend} erc weights build"
    manifest_path = folder / EXPORT_MANIFEST
    if not manifest_path.is_file() or not (folder / _FILES[backend]).is_file():
        raise EncoderBackendError(f"no {backend} export of the encoder in {folder}; build it with `{command}`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("source") != source or manifest.get("backend") != backend:
        raise EncoderBackendError(
            f"the {backend} export in {folder} was made from encoder {manifest.get('source')}, "
            f"not the loaded {source}; rebuild it with `{command} --force`"
        )
    return manifest


class _Pipeline:
    """Mean pooling + L2 normalisation on top of the transformer, as one traced module."""

    @staticmethod
    def wrap(transformer):
        import torch

        class Sentence(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.transformer = transformer

            def forward(self, input_ids, attention_mask, token_type_ids):
                hidden = self.transformer(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2, dim=1)

        return Sentence().eval()


def export(source_folder: Path, out_dir: Path, backend: str, identity: dict[str, Any]) -> Path:
    """Export the sentence-transformers model in ``source_folder`` to ``out_dir`` for ``backend``
    (fp32; ``onnx-int8``: the fp32 ONNX graph with its weights then quantized to int8, per
    channel, activations quantized at run time), atomically: a half-written export never sits at
    ``out_dir``."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    if backend not in _FILES:
        raise ValueError(f"nothing to export for backend {backend!r}")
    _require_runtime(backend)
    model = SentenceTransformer(str(source_folder), device="cpu")
    module = _Pipeline.wrap(model[0].auto_model.eval())
    sample = model.tokenizer(["a sample sentence", "and another one"], padding=True, return_tensors="pt")
    args = tuple(sample[name] for name in _INPUTS)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer's notes on the attention mask's branches: constant for an encoder (no cache).
        warnings.simplefilter("ignore")
        if _RUNTIME[backend][0] == "onnxruntime":
            try:
                import onnx  # noqa: F401  (torch.onnx.export needs it)
            except ImportError:
                raise EncoderBackendError(
                    "exporting to ONNX needs the onnx package: pip install -e '.[train]'"
                ) from None
            axes = {name: {0: "batch", 1: "sequence"} for name in _INPUTS}
            torch.onnx.export(
                module,
                args,
                str(tmp / _FILES["onnx"]),
                input_names=list(_INPUTS),
                output_names=["sentence_embedding"],
                dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
            if backend == "onnx-int8":
                _quantize(tmp / _FILES["onnx"])
            runtime = "onnxruntime"
        else:
            import openvino as ov

            converted = ov.convert_model(module, example_input=dict(zip(_INPUTS, args)))
            ov.save_model(converted, str(tmp / _FILES["openvino"]), compress_to_fp16=False)
            runtime = "openvino"
    manifest = {
        "export_version": EXPORT_VERSION,
        "backend": backend,
        "source": identity,
        "source_folder": str(source_folder),
        "max_seq_length": _max_seq_length(source_folder),
        "precision": PRECISION[backend],
        "exported_with": {
            "torch": torch.__version__,
            runtime: importlib.metadata.version(runtime),
        },
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def _quantize(model: Path) -> None:
    """Quantize the fp32 graph at ``model`` in place: int8 weights per output channel, int8
    activations scaled per call (ONNX Runtime's dynamic quantization: no calibration data, so
    nothing of the datasets goes into the export). On this CPU (AVX-512 VNNI) it embeds one
    utterance in about half the fp32 time; the embeddings move by a cosine of about 0.99."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = model.with_name("prepared.onnx")
    # Symbolic shape inference cannot follow the traced attention mask; ONNX's own suffices.
    quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
    quantize_dynamic(str(prepared), str(model), weight_type=QuantType.QInt8, per_channel=True)
    prepared.unlink()


class ExportedEncoder:
    """An export run by ONNX Runtime or OpenVINO with ``threads`` intra-op threads (0: the
    runtime's default, every core). ``encode`` returns L2-normalised float32 rows."""

    def __init__(self, source_folder: Path, folder: Path, backend: str, threads: int, manifest: dict) -> None:
        _require_runtime(backend)
        from transformers import AutoTokenizer

        self.backend = backend
        self.folder = folder
        self.max_length = int(manifest["max_seq_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(str(source_folder))
        if _RUNTIME[backend][0] == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # An idle thread pool that spins steals the core from the engine.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(
                str(folder / _FILES["onnx"]), options, providers=["CPUExecutionProvider"]
            )
            self._run = lambda feed: self._session.run(None, feed)[0]
        else:
            import openvino as ov

            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = ov.Core().compile_model(str(folder / _FILES["openvino"]), "CPU", config)
            request = compiled.create_infer_request()
            self._run = lambda feed: request.infer(feed)[0].copy()

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        # Shortest first, as sentence-transformers does: a batch pads to its longest text.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[np.ndarray] = []
        for start in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            tokens = self.tokenizer(
                chunk, padding=True, truncation="longest_first", max_length=self.max_length, return_tensors="np"
            )
            feed = {name: np.asarray(tokens[name], dtype=np.int64) for name in _INPUTS}
            out.append(self._run(feed))
        vectors = np.concatenate(out)
        result = np.empty_like(vectors)
        result[order] = vectors
        return result
