"""``erc.json``: what every servable model folder declares about the prompts it was trained on.

The service renders prompts from this file, never from its own defaults, so a model is always
served with the template, window and demonstrations it was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from service.labels import LABEL_SETS
from service.templates import DEFAULT_WINDOW, TEMPLATE_VERSION

SPEC_FILE = "erc.json"


class SpecError(ValueError):
    """A model folder without a usable ``erc.json``."""


class Demonstrations(BaseModel):
    k: int = Field(default=3, ge=0, le=32, description="Demonstrations per prompt (0: none).")
    index: str = Field(default="meld", description="Index name under ERC_INDEX_ROOT.")


class ServingSpec(BaseModel):
    label_set: str = "meld"
    template_version: str = TEMPLATE_VERSION
    window: int = Field(default=DEFAULT_WINDOW, ge=0)
    demonstrations: Demonstrations = Demonstrations()
    #: Free-form provenance (base model, adapter, training config), shown by the API.
    model_name: str = "model"

    @field_validator("label_set")
    @classmethod
    def _known_label_set(cls, value: str) -> str:
        if value not in LABEL_SETS:
            raise ValueError(f"unknown label set {value!r}; known: {', '.join(LABEL_SETS)}")
        return value

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")

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
