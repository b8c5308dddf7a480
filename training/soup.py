"""Weight averaging of LoRA adapters trained from one another (a "model soup"): one adapter
whose merged weights are exactly the weighted mean of the inputs' merged weights.

    python -m training.soup training/candidates/gemma3-270m-erc3c \\
        training/candidates/gemma3-270m-erc3d --out training/candidates/gemma3-270m-erc3cd

LoRA adds ``scale * B @ A`` to a weight. The mean of two such updates is one LoRA update of the
summed rank: ``A`` stacked, ``B`` side by side with each input's share folded in, ``lora_alpha``
raised with ``r`` so that ``scale = lora_alpha / r`` stays what every input had. Nothing is
approximated, so ``erc merge`` and the service treat the result like any other adapter. The
inputs must agree on backbone, modules, layers, scale and everything in ``erc.json`` but the
name and the calibration, which is dropped: a soup is calibrated afresh (``erc calibrate``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from service.spec import ServingSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The adapter_config.json keys that must be equal in every input (r and lora_alpha may differ
#: as long as their ratio does not).
_SHARED = ("base_model_name_or_path", "peft_type", "task_type", "layers_to_transform", "use_rslora", "use_dora")


def _scale(config: dict) -> float:
    return config["lora_alpha"] / config["r"]


def _check_compatible(adapters: Sequence[Path], configs: list[dict], specs: list[ServingSpec]) -> None:
    """Raise ValueError naming the first adapter that differs from the first one."""
    first = configs[0]
    for path, config, spec in zip(adapters[1:], configs[1:], specs[1:]):
        for key in _SHARED:
            if config.get(key) != first.get(key):
                raise ValueError(f"{path}: {key} is {config.get(key)!r}, {adapters[0]} has {first.get(key)!r}")
        if set(config["target_modules"]) != set(first["target_modules"]):
            raise ValueError(f"{path}: target_modules differ from {adapters[0]}'s")
        if abs(_scale(config) - _scale(first)) > 1e-9:
            raise ValueError(f"{path}: lora_alpha / r is {_scale(config)}, {adapters[0]} has {_scale(first)}")
        if _uncalibrated(spec) != _uncalibrated(specs[0]):
            raise ValueError(f"{path}: erc.json differs from {adapters[0]}'s beyond the name and the calibration")


def average_adapters(adapters: Sequence[Path], out: Path, shares: Sequence[float] | None = None) -> Path:
    """Write to ``out`` the LoRA adapter whose update is ``sum(share_i * update_i)``
    (``shares`` default to equal and must sum to 1) and return ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    if len(adapters) < 2:
        raise ValueError("average at least two adapters")
    shares = list(shares) if shares is not None else [1 / len(adapters)] * len(adapters)
    if len(shares) != len(adapters) or abs(sum(shares) - 1) > 1e-6 or min(shares) <= 0:
        raise ValueError(f"shares {shares}: one positive share per adapter, summing to 1")
    configs = [json.loads((a / ADAPTER_CONFIG).read_text()) for a in adapters]
    specs = [ServingSpec.load(a) for a in adapters]
    _check_compatible(adapters, configs, specs)

    tensors = [load_file(str(a / ADAPTER_WEIGHTS)) for a in adapters]
    keys = set(tensors[0])
    for path, t in zip(adapters[1:], tensors[1:]):
        if set(t) != keys:
            raise ValueError(f"{path}: its LoRA tensors are not {adapters[0]}'s")
    merged: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        if ".lora_A." in key:
            merged[key] = torch.cat([t[key] for t in tensors], dim=0).contiguous()
        elif ".lora_B." in key:
            merged[key] = torch.cat([share * t[key] for share, t in zip(shares, tensors)], dim=1).contiguous()
        else:
            raise ValueError(f"{adapters[0]}: {key} is neither lora_A nor lora_B; only plain LoRA averages")
    first = configs[0]
    rank = sum(c["r"] for c in configs)
    alpha = _scale(first) * rank
    config = dict(
        first, r=rank, lora_alpha=int(alpha) if alpha.is_integer() else alpha, rank_pattern={}, alpha_pattern={}
    )
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    spec = specs[0].model_copy(update={"model_name": out.name}, deep=True)
    for label_set in spec.label_sets.values():
        label_set.calibration = label_set.calibration_int8 = None
    spec.save(out)
    (out / "soup.json").write_text(
        json.dumps({"adapters": [str(a) for a in adapters], "shares": shares}, indent=1) + "\n"
    )
    return out


def _uncalibrated(spec: ServingSpec) -> dict:
    data = json.loads(spec.model_dump_json(exclude={"model_name"}))
    for label_set in data.get("label_sets", {}).values():
        label_set.pop("calibration", None)
        label_set.pop("calibration_int8", None)
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.soup", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+", type=Path, help="LoRA adapter folders (each with erc.json)")
    parser.add_argument("--out", type=Path, required=True, help="the averaged adapter's folder")
    parser.add_argument("--shares", type=float, nargs="+", help="one weight per adapter, summing to 1 (default: equal)")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {average_adapters(args.adapters, args.out, args.shares)}")
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


if __name__ == "__main__":
    main()
