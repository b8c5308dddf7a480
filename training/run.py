"""``erc train``: load data, model and index for a config, build examples, train."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import devices
from service.data import Dialogue, load_split
from service.settings import Settings
from service.templates import Shown
from training.config import TrainConfig
from training.examples import Example, build_examples, retrieve_demonstrations

Demos = dict[tuple[str, int], list[Shown]]


def base_model_dir(config: TrainConfig, settings: Settings) -> Path:
    """The checkpoint a run adapts: ``embedded`` (weights/base), the name of a committed adapter
    (trained on top of it: weights/<name>, its merge), a folder, or the config's catalogue
    ``backbone`` (weights/<backbone>-base, fetched and converted when missing)."""
    from service.served_model import adapters
    from training.weights import backbone_dir, build_all, build_backbone

    if config.backbone is not None:
        build_backbone(settings.weights_root, config.backbone)
        return backbone_dir(settings.weights_root, config.backbone)

    name = "base" if config.base_model == "embedded" else config.base_model
    if name == "base" or name in {a.name for a in adapters(settings.weights_root)}:
        folder = settings.weights_root / name
        if not (folder / "config.json").is_file():
            build_all(settings.weights_root)
        return folder
    return Path(config.base_model)


def load_lora_model(config: TrainConfig, folder: Path) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, config.dtype))
    model.to(devices.resolve(config.device))
    layers = model.config.num_hidden_layers
    top = config.lora.top_layers
    lora = LoraConfig(
        r=config.lora.rank,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=config.lora.target_modules,
        layers_to_transform=list(range(layers - top, layers)) if top else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if config.init_adapter is not None:
        from training.trainer import start_from

        start_from(model, Path(config.init_adapter))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


@dataclass
class Corpus:
    """The dialogues of a run and their retrieved demonstrations (empty lists when off)."""

    train: list[Dialogue]
    dev: list[Dialogue]
    train_demos: Demos
    dev_demos: Demos


def _demos_to_json(demos: Demos) -> list:
    return [[d, t, [[s.text, s.label] for s in shown]] for (d, t), shown in demos.items()]


def _demos_from_json(rows: list) -> Demos:
    return {(d, t): [Shown(text, label) for text, label in shown] for d, t, shown in rows}


def load_corpus(config: TrainConfig, settings: Settings, limit: int | None = None, cache: Path | None = None) -> Corpus:
    """Dialogues and demonstrations for ``config``. With ``cache``, demonstrations are read from
    that JSON file when it was written for the same dataset, index and k (so a machine without
    the encoder and index, e.g. a GPU box, can train), else retrieved and written there."""
    train = load_split(settings.data_dir, config.dataset, "train", config.source)
    dev = load_split(settings.data_dir, config.dataset, "valid", config.source)
    if limit:
        train, dev = train[:limit], dev[: max(1, limit // 4)]
    k = config.demonstrations.k if config.demonstrations.enabled else 0
    same_label = config.demonstrations.same_label
    key = {"dataset": config.dataset, "source": config.source, "index": config.demonstrations.index, "k": k}
    if same_label:
        key["same_label"] = True
    if k and cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["key"] == key:
            found = _demos_from_json(stored["train"]), _demos_from_json(stored["valid"])
            # Train and dev dialogue ids overlap (MELD numbers each split from 0): check each apart.
            complete = all(
                (d.id, t) in demos
                for dialogues, demos in zip((train, dev), found)
                for d in dialogues
                for t in range(len(d.turns))
            )
            if complete:
                return Corpus(train, dev, *found)
    index = None
    if k:
        from service.retrieval import DemonstrationIndex, Encoder

        # A bulk job: the encoder on every core (ERC_ENCODER_THREADS is the serving process's share).
        encoder = Encoder.from_settings(settings, threads=0)
        index = DemonstrationIndex(settings.index_root / config.demonstrations.index, encoder)
    own = index is not None and index.manifest["split"] == "train"
    corpus = Corpus(
        train,
        dev,
        retrieve_demonstrations(train, index, k, own_split=own, same_label=same_label),
        retrieve_demonstrations(dev, index, k, own_split=False),
    )
    if k and cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "key": key,
            "index_checksum": index.manifest.get("data_checksum"),
            "train": _demos_to_json(corpus.train_demos),
            "valid": _demos_to_json(corpus.dev_demos),
        }
        cache.write_text(json.dumps(body))
    return corpus


def examples_for(
    config: TrainConfig, corpus: Corpus, tokenizer: Any, dev_sample: int | None
) -> tuple[list[Example], list[Example]]:
    """Training examples of the config's tasks, and ERC dev examples (a seeded sample of
    ``dev_sample``, or all of them)."""
    on = config.demonstrations.enabled and config.demonstrations.k > 0
    train_demos = corpus.train_demos if on else {}
    dev_demos = corpus.dev_demos if on else {}
    train_examples = build_examples(
        corpus.train, config.dataset, tokenizer, config.tasks, config.window, train_demos, config.max_length
    )
    dev_all = build_examples(
        corpus.dev, config.dataset, tokenizer, ["erc"], config.window, dev_demos, config.max_length
    )
    if dev_sample is None or dev_sample >= len(dev_all):
        return train_examples, dev_all
    return train_examples, random.Random(config.seed).sample(dev_all, dev_sample)


def _part_cache(cache: Path | None, part: TrainConfig, parts: int) -> Path | None:
    # One cache file per dataset of a mixed run (each is keyed and checked on its own).
    if cache is None or parts == 1:
        return cache
    return cache.with_name(f"{cache.stem}-{part.dataset}{cache.suffix}")


def mixed_examples(
    config: TrainConfig,
    settings: Settings,
    tokenizer: Any,
    limit: int | None = None,
    demonstrations_cache: Path | None = None,
) -> tuple[list[Example], list[Example]]:
    """Training and dev examples of every dataset of ``config``; ``eval_examples`` is split
    evenly between the datasets' dev sets."""
    parts = config.parts()
    dev_sample = None if config.eval_examples is None else max(1, config.eval_examples // len(parts))
    train_all: list[Example] = []
    dev_all: list[Example] = []
    for part, cap in parts:
        corpus = load_corpus(part, settings, limit, _part_cache(demonstrations_cache, part, len(parts)))
        train_examples, dev_examples = examples_for(part, corpus, tokenizer, dev_sample)
        if cap is not None and cap < len(train_examples):
            train_examples = random.Random(config.seed).sample(train_examples, cap)
        print(
            f"{part.dataset}: {len(train_examples)} training examples, window {part.window}, "
            f"k {part.demonstrations.k if part.demonstrations.enabled else 0}",
            flush=True,
        )
        train_all.extend(train_examples)
        dev_all.extend(dev_examples)
    return train_all, dev_all


def run(
    config: TrainConfig | Path,
    resume: bool,
    settings: Settings,
    out_root: Path = Path("runs"),
    limit: int | None = None,
    demonstrations_cache: Path | None = None,
) -> dict:
    """Train one config (a TOML path, or a config already loaded: the backbone study derives one
    per candidate) into ``out_root/<name>``; returns the training summary."""
    from training.trainer import train

    if not isinstance(config, TrainConfig):
        config = TrainConfig.load(config)
    model, tokenizer = load_lora_model(config, base_model_dir(config, settings))
    train_examples, dev_examples = mixed_examples(config, settings, tokenizer, limit, demonstrations_cache)
    tokens = sum(e.length for e in train_examples)
    print(
        f"{len(train_examples)} training examples ({tokens} tokens), {len(dev_examples)} dev examples for selection",
        flush=True,
    )
    return train(config, model, tokenizer, train_examples, dev_examples, out_root / config.name, resume=resume)
