"""Which model folder the service serves: the one place that works it out, for ``erc serve``,
``erc evaluate``, ``erc calibrate`` and ``erc bench``.

Layout under ``ERC_WEIGHTS_ROOT`` (``weights/``): ``adapters/<name>/`` (committed LoRA adapters,
each with its ``erc.json``; ``adapters/DEFAULT`` names the default one), ``base/`` (the embedded
SmolLM2, converted), ``<name>/`` (an adapter merged into its base: what vLLM serves) and
``<name>-int8/`` (its int8 build). :mod:`training.weights` builds them; this module only reads
the layout, so serving never imports the building code (transformers, peft, gguf).
"""

from __future__ import annotations

import logging
from pathlib import Path

from service.settings import Settings
from service.spec import SPEC_FILE, ServingSpec

log = logging.getLogger(__name__)

BASE_NAME = "base"
ADAPTERS = "adapters"
DEFAULT_FILE = "DEFAULT"
INT8_SUFFIX = "-int8"


class WeightsError(RuntimeError):
    """The weights folder does not hold what a setting or a build names."""


def adapters(weights_root: Path) -> list[Path]:
    """Committed LoRA adapters (folders holding ``adapter_config.json`` and ``erc.json``), each
    after the adapter it was trained on top of (its ``base_adapter``), else by name."""
    root = weights_root / ADAPTERS
    found = {
        p.name: p
        for p in sorted(root.glob("*/"))
        if (p / "adapter_config.json").is_file() and (p / SPEC_FILE).is_file()
    }
    ordered: list[Path] = []
    placed: set[str] = set()
    pending = dict(found)
    while pending:
        ready = [
            name
            for name, p in pending.items()
            if (ServingSpec.load(p).base_adapter or BASE_NAME) in placed | {BASE_NAME}
        ]
        if not ready:
            raise WeightsError(f"adapters {', '.join(pending)} name a base_adapter that is not committed (or a cycle)")
        for name in ready:
            ordered.append(pending.pop(name))
            placed.add(name)
    return ordered


def default_adapter(weights_root: Path) -> str:
    """The adapter served when ``ERC_MODEL`` is unset: the one ``weights/adapters/DEFAULT`` names
    (else the first committed one); without adapters, ``base`` (the embedded model, untrained)."""
    named = weights_root / ADAPTERS / DEFAULT_FILE
    if named.is_file():
        name = named.read_text().strip()
        if not (weights_root / ADAPTERS / name / SPEC_FILE).is_file():
            raise WeightsError(f"{named} names {name!r}, which is not a committed adapter")
        return name
    found = adapters(weights_root)
    return found[0].name if found else BASE_NAME


def default_model_dir(weights_root: Path) -> Path:
    """The merge of :func:`default_adapter`: the float checkpoint served by default."""
    return weights_root / default_adapter(weights_root)


def adapter_of(model_dir: Path) -> str:
    """The committed adapter a built folder comes from: its own name, less ``-int8``."""
    return model_dir.name.removesuffix(INT8_SUFFIX)


def served_model_dir(settings: Settings, folder: Path | None = None) -> Path:
    """The servable folder that ``settings`` name.

    ``folder`` (a command's ``--model``), else ``ERC_MODEL_DIR``, is served as it is; otherwise
    the merge of ``ERC_MODEL`` (default: :func:`default_adapter`), or its int8 build with
    ``ERC_PRECISION=int8``. Raises :class:`WeightsError` for an adapter that is not committed or
    an int8 build that is not built."""
    explicit = folder or settings.model_dir
    if explicit is not None:
        chosen = {"model", "precision"} & settings.model_fields_set
        if chosen:
            log.warning(
                "serving %s as named; %s ignored",
                explicit,
                " and ".join(f"ERC_{name.upper()}" for name in sorted(chosen)),
            )
        return explicit
    root = settings.weights_root
    name = settings.model or default_adapter(root)
    if name != BASE_NAME and not (root / ADAPTERS / name / SPEC_FILE).is_file():
        committed = ", ".join(p.name for p in adapters(root)) or "none"
        raise WeightsError(
            f"ERC_MODEL={name!r} is not a committed adapter under {root / ADAPTERS} (committed: {committed})"
        )
    if settings.precision == "float":
        if not (root / name / SPEC_FILE).is_file():
            # An image bakes in one model (Dockerfile: SERVED_MODEL build argument): say so, not a load error.
            raise WeightsError(f"ERC_MODEL={name!r}: {root / name} is not built; build it with `erc weights build`")
        return root / name
    if name == BASE_NAME:
        raise WeightsError("ERC_PRECISION=int8 needs an adapter: the embedded base model has no int8 build")
    built = root / (name + INT8_SUFFIX)
    if not (built / SPEC_FILE).is_file():
        raise WeightsError(f"ERC_PRECISION=int8: {built} is not built; build it with `erc weights build --int8`")
    return built
