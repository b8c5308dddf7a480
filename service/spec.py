"""``erc.json``: what every servable model folder declares about the prompts it was trained on.

The service renders prompts from this file, never from its own defaults, so a model is always
served with the template, window and demonstrations it was trained with, and only for the label
sets it was trained on. Each label set may carry a calibration fitted on its dev split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from service.labels import LABEL_SETS
from service.templates import DEFAULT_WINDOW, TEMPLATE_VERSION

SPEC_FILE = "erc.json"


class SpecError(ValueError):
    """A model folder without a usable ``erc.json``."""


class Demonstrations(BaseModel):
    k: int = Field(default=3, ge=0, le=32, description="Demonstrations per prompt (0: none).")
    index: str = Field(default="meld", description="Index name under ERC_INDEX_ROOT.")


class Calibration(BaseModel):
    """Served distribution = softmax((log p + bias) / temperature), p the engine's distribution.

    The bias moves the decision (fitted for weighted F1); the temperature leaves the argmax
    alone and makes the probabilities mean what they say (fitted for log-likelihood)."""

    bias: list[float] = Field(description="One log-space offset per label, in the label set's order.")
    temperature: float = Field(gt=0)
    fitted_on: str = Field(default="", description="Where it was fitted, e.g. 'meld valid, 1109 utterances'.")


class LabelSetSpec(BaseModel):
    window: int = Field(default=DEFAULT_WINDOW, ge=0)
    demonstrations: Demonstrations = Demonstrations()
    calibration: Calibration | None = None
    #: Fitted on the int8 build's own dev scores (`ERC_PRECISION=int8 erc calibrate`): int8 moves the
    #: engine's distribution away from the one the float calibration was fitted on. The int8 build
    #: serves it as its ``calibration``.
    calibration_int8: Calibration | None = None


class ServingSpec(BaseModel):
    template_version: str = TEMPLATE_VERSION
    #: The label sets the model was trained on: the only ones it serves.
    label_sets: dict[str, LabelSetSpec] = Field(default_factory=lambda: {"meld": LabelSetSpec()})
    #: The label set of a request that names none.
    default_label_set: str = "meld"
    #: Free-form provenance (base model, adapter, training config), shown by the API.
    model_name: str = "model"
    #: An adapter trained on top of another one names it: it is merged into that one's merge.
    base_adapter: str | None = None
    #: The catalogue backbone (training/backbones.py) an adapter was trained on, merged into its
    #: converted checkpoint (``weights/<backbone>-base``); None: the embedded SmolLM2 (``weights/base``).
    backbone: str | None = None
    #: Set by `erc weights build --int8` on the folder it quantizes: ``"int8"`` (weights int8 per
    #: output channel, activations int8 per token at run time; norms and embeddings unquantized).
    quantization: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _single_label_set_form(cls, data: Any) -> Any:
        # erc.json of a single-dataset model (the first release's form): one label set at top level.
        if isinstance(data, dict) and {"label_set", "window", "demonstrations"} & data.keys():
            data = dict(data)
            name = data.pop("label_set", "meld")
            entry = {k: data.pop(k) for k in ("window", "demonstrations") if k in data}
            data.setdefault("label_sets", {name: entry})
            data.setdefault("default_label_set", name)
        return data

    @field_validator("label_sets")
    @classmethod
    def _known_label_sets(cls, value: dict[str, LabelSetSpec]) -> dict[str, LabelSetSpec]:
        if not value:
            raise ValueError("names no label set")
        for name, entry in value.items():
            if name not in LABEL_SETS:
                raise ValueError(f"unknown label set {name!r}; known: {', '.join(LABEL_SETS)}")
            for cal in (entry.calibration, entry.calibration_int8):
                if cal and len(cal.bias) != len(LABEL_SETS[name]):
                    raise ValueError(
                        f"{name}: calibration has {len(cal.bias)} biases for {len(LABEL_SETS[name])} labels"
                    )
        return value

    @model_validator(mode="after")
    def _default_is_served(self) -> "ServingSpec":
        if self.default_label_set not in self.label_sets:
            raise ValueError(f"default label set {self.default_label_set!r} is not among {', '.join(self.label_sets)}")
        return self

    def precision(self, dtype: str) -> str:
        """What the engine computes in, as the card names its tables: ``int8`` for a quantized
        build, else the engine's dtype (``float32``, ``bfloat16``)."""
        return self.quantization or dtype

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "ServingSpec":
        path = folder / SPEC_FILE
        if not path.is_file():
            raise SpecError(f"{folder} has no {SPEC_FILE}; build servable weights with `erc weights build`")
        try:
            spec = cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            raise SpecError(f"{path} is invalid: {exc}") from None
        if spec.template_version != TEMPLATE_VERSION:
            raise SpecError(
                f"{path} was trained with template {spec.template_version!r}, but this service "
                f"renders {TEMPLATE_VERSION!r}; serve it with the release that trained it"
            )
        return spec
