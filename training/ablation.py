"""``erc ablate``: the InstructERC ablation (ERC only; + demonstrations; + speaker
identification; + emotion prediction; all) at one training budget per arm, scored on the whole
dev split. Every arm trains on the same number of tokens, so an auxiliary task costs ERC
examples: the question is whether it pays for the tokens it takes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from service.decoding import LabelCodec
from service.evaluation import scores
from service.labels import LABEL_SETS
from service.settings import Settings
from training.config import TrainConfig
from training.run import base_model_dir, examples_for, load_corpus, load_lora_model

#: arm name -> (tasks, demonstrations on)
ARMS: dict[str, tuple[list[str], bool]] = {
    "erc": (["erc"], False),
    "erc+demonstrations": (["erc"], True),
    "erc+speaker": (["erc", "speaker"], False),
    "erc+prediction": (["erc", "prediction"], False),
    "all": (["erc", "speaker", "prediction"], True),
}


def arm_config(config: TrainConfig, arm: str) -> TrainConfig:
    tasks, demos = ARMS[arm]
    return config.model_copy(
        update={
            "name": f"{config.name}-{arm.replace('+', '-')}",
            "tasks": tasks,
            "demonstrations": config.demonstrations.model_copy(update={"enabled": demos}),
        }
    )


def steps_for_budget(examples: list, batch_size: int, seed: int, budget_tokens: int) -> tuple[int, int]:
    """Steps until the trainer's batch order (epoch after epoch) has fed ``budget_tokens``, and
    the steps of one epoch."""
    from training.trainer import batches

    fed, steps, epoch = 0, 0, 0
    per_epoch = None
    while True:
        order = batches(examples, batch_size, seed, epoch)
        per_epoch = per_epoch or len(order)
        for batch in order:
            fed += sum(examples[i].length for i in batch)
            steps += 1
            if fed >= budget_tokens:
                return steps, per_epoch
        epoch += 1


def ablate(
    config: TrainConfig,
    settings: Settings,
    budget_tokens: int,
    arms: list[str],
    out_root: Path,
    limit: int | None = None,
    demonstrations_cache: Path | None = None,
) -> list[dict]:
    """Train each arm for ``budget_tokens`` training tokens (a shuffled prefix, same seed) and
    score its last checkpoint on all of dev. Writes ``out_root/ablation.json`` and ``.md``."""
    from training.trainer import score_examples, train

    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
    corpus = load_corpus(
        config.model_copy(update={"demonstrations": config.demonstrations.model_copy(update={"enabled": True})}),
        settings,
        limit,
        demonstrations_cache,
    )
    rows = []
    for arm in arms:
        cfg = arm_config(config, arm)
        model, tokenizer = load_lora_model(cfg, base_model_dir(cfg, settings))
        train_examples, dev_examples = examples_for(cfg, corpus, tokenizer, None)
        steps, per_epoch = steps_for_budget(train_examples, cfg.batch_size, cfg.seed, budget_tokens)
        epochs = steps / per_epoch
        # The arm's last step is scored; no checkpoint selection within an arm.
        cfg = cfg.model_copy(
            update={"epochs": epochs, "max_steps": steps, "checkpoint_every": steps + 1, "max_minutes": None}
        )
        started = time.monotonic()
        summary = train(cfg, model, tokenizer, train_examples, [], out_root / cfg.name)
        codec = LabelCodec.build(tokenizer, LABEL_SETS[cfg.dataset])
        predicted = score_examples(model, dev_examples, codec, max(16, 2 * cfg.batch_size), cfg.autocast_bf16)
        result = scores([e.label for e in dev_examples], predicted, codec.labels)
        rows.append(
            {
                "arm": arm,
                "tasks": cfg.tasks,
                "demonstrations": cfg.demonstrations.enabled,
                "train_examples": len(train_examples),
                "epochs": round(epochs, 3),
                "steps": summary["steps"],
                "dev_count": len(dev_examples),
                "dev_weighted_f1": round(result["weighted_f1"], 2),
                "dev_accuracy": round(result["accuracy"], 2),
                "wall_s": round(time.monotonic() - started, 1),
            }
        )
        print(f"{arm}: dev weighted F1 {result['weighted_f1']:.2f}, accuracy {result['accuracy']:.2f}", flush=True)
        del model
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / "ablation.json").write_text(
        json.dumps({"config": config.model_dump(), "budget_tokens": budget_tokens, "arms": rows}, indent=2)
    )
    (out_root / "ablation.md").write_text(table(rows, budget_tokens))
    return rows


def table(rows: list[dict], budget_tokens: int) -> str:
    lines = [
        f"Same budget per arm: {budget_tokens:,} training tokens; "
        f"scored on {rows[0]['dev_count'] if rows else 0} dev utterances.",
        "",
        "| arm | tasks | demonstrations | epochs of its data | steps | dev weighted F1 | dev accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {', '.join(r['tasks'])} | {'yes' if r['demonstrations'] else 'no'} | {r['epochs']} "
            f"| {r['steps']} | {r['dev_weighted_f1']:.2f} | {r['dev_accuracy']:.2f} |"
        )
    return "\n".join(lines) + "\n"
