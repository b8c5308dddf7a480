"""Training configuration, read from a TOML file (``training/configs/<name>.toml``)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.data import default_source


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSection(_Section):
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    #: Train only the top N transformer layers (None: all). Lower layers stay frozen, so the
    #: backward pass stops at the first adapted layer.
    top_layers: int | None = 8


class DemonstrationsSection(_Section):
    enabled: bool = True
    k: int = 3
    index: str = "meld"
    #: Training examples show the nearest pool utterances that share their gold label (the
    #: paper's same-label demonstrations; an ablation: dev and serving stay label-blind).
    same_label: bool = False


class MixtureItem(_Section):
    """One dataset of a multi-dataset run (InstructERC's unified setting): its examples keep
    their own label statement, label set, window and demonstrations."""

    dataset: Literal["meld", "iemocap", "emorynlp"]
    #: Default: csv (IEMOCAP: cosmic, the only form it exists in).
    source: Literal["csv", "cosmic"] | None = None
    #: Default: the run's window.
    window: int | None = None
    #: Default: the run's demonstrations section with this dataset's own index.
    demonstrations: DemonstrationsSection | None = None
    #: A seeded sample of this many training examples (e.g. a replay share of a dataset the
    #: base model was already trained on); None: all of them.
    max_train_examples: int | None = Field(default=None, ge=1)


class TrainConfig(_Section):
    name: str
    #: A folder with a Hugging Face checkpoint, or "embedded" (weights/base, built from the GGUF).
    base_model: str = "embedded"
    #: Adapt a catalogue backbone (training/backbones.py, converted by ``erc weights build
    #: --backbone``) instead; its adapters merge into ``weights/<backbone>-base``. Excludes
    #: ``base_model``.
    backbone: str | None = None
    #: A committed adapter folder (same base and LoRA shape) whose weights start this run: how a
    #: run continues on a machine where its checkpoints (``runs/``, not committed) are gone. The
    #: optimizer and learning-rate schedule start afresh.
    init_adapter: str | None = None
    #: Batches of the first epoch's order (same seed) that ``init_adapter``'s run already trained
    #: on; this run starts after them, so it sees examples that run did not.
    skip_steps: int = Field(default=0, ge=0)
    dataset: Literal["meld", "iemocap", "emorynlp"] = "meld"
    source: Literal["csv", "cosmic"] = "csv"
    window: int = 12
    demonstrations: DemonstrationsSection = DemonstrationsSection()
    #: Auxiliary tasks of InstructERC: "speaker" (speaker identification, mixed in) and
    #: "prediction" (the official emotion-prediction input: main prompt + *** + history-only).
    tasks: list[Literal["erc", "speaker", "prediction"]] = ["erc"]
    lora: LoraSection = LoraSection()
    learning_rate: float = 5e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    epochs: float = Field(default=1.0, gt=0, description="May be fractional: a prefix of the shuffled order.")
    #: Exactly this many optimizer steps, whatever ``epochs`` says (the ablation's token budget).
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = 8
    max_length: int = 1024
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    #: bf16 autocast on CPU (AMX) or GPU; master weights stay float32.
    autocast_bf16: bool = True
    checkpoint_every: int = 100
    eval_every: int = 200
    eval_examples: int = 300
    #: Stop (saving a checkpoint) after this many minutes of training; None: no limit.
    max_minutes: float | None = None
    gradient_checkpointing: bool = False
    #: "auto": the GPU when torch sees one, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Several datasets in one run; empty: the single ``dataset`` above.
    mixture: list[MixtureItem] = []

    def parts(self) -> list[tuple["TrainConfig", int | None]]:
        """One single-dataset config per dataset of the run, with its training-example cap."""
        if not self.mixture:
            return [(self, None)]
        out = []
        for item in self.mixture:
            demos = item.demonstrations or self.demonstrations.model_copy(update={"index": item.dataset})
            part = self.model_copy(
                update={
                    "dataset": item.dataset,
                    "source": item.source or default_source(item.dataset),
                    "window": self.window if item.window is None else item.window,
                    "demonstrations": demos,
                    "mixture": [],
                }
            )
            out.append((part, item.max_train_examples))
        return out

    @model_validator(mode="after")
    def _one_base(self) -> "TrainConfig":
        if self.backbone is not None and self.base_model != "embedded":
            raise ValueError("set backbone or base_model, not both")
        return self

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        with path.open("rb") as fh:
            return cls.model_validate(tomllib.load(fh))
