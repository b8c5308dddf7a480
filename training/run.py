"""``erc train``: load data, model and index for a config, build examples, train."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from service.data import load_split
from service.settings import Settings
from training.config import TrainConfig
from training.examples import build_examples, retrieve_demonstrations


def base_model_dir(config: TrainConfig, settings: Settings) -> Path:
    if config.base_model != "embedded":
        return Path(config.base_model)
    base = settings.weights_root / "base"
    if not (base / "config.json").is_file():
        from service.weights import build_all

        build_all(settings.weights_root)
    return base


def load_lora_model(config: TrainConfig, folder: Path) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, config.dtype))
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
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, tokenizer


def run(config_path: Path, resume: bool, settings: Settings, out_root: Path = Path("runs"), limit: int | None = None) -> dict:
    from training.trainer import train

    config = TrainConfig.load(config_path)
    model, tokenizer = load_lora_model(config, base_model_dir(config, settings))
    train_dialogues = load_split(settings.data_dir, config.dataset, "train", config.source)
    dev_dialogues = load_split(settings.data_dir, config.dataset, "valid", config.source)
    if limit:
        train_dialogues = train_dialogues[:limit]
        dev_dialogues = dev_dialogues[: max(1, limit // 4)]
    index = None
    k = config.demonstrations.k if config.demonstrations.enabled else 0
    if k:
        from service.retrieval import DemonstrationIndex, Encoder

        index = DemonstrationIndex(settings.index_root / config.demonstrations.index, Encoder(settings.encoder_dir, settings.encoder_batch_size))
    own = index is not None and index.manifest["split"] == "train"
    train_demos = retrieve_demonstrations(train_dialogues, index, k, own_split=own)
    dev_demos = retrieve_demonstrations(dev_dialogues, index, k, own_split=False)
    train_examples = build_examples(train_dialogues, config.dataset, tokenizer, config.tasks, config.window, train_demos, config.max_length)
    dev_all = build_examples(dev_dialogues, config.dataset, tokenizer, ["erc"], config.window, dev_demos, config.max_length)
    dev_examples = random.Random(config.seed).sample(dev_all, min(config.eval_examples, len(dev_all)))
    tokens = sum(e.length for e in train_examples)
    print(f"{len(train_examples)} training examples ({tokens} tokens), {len(dev_examples)} dev examples for selection", flush=True)
    return train(config, model, tokenizer, train_examples, dev_examples, out_root / config.name, resume=resume)
