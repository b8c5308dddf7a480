"""The LoRA training loop: loss on the target tokens only, logits computed only where a target
token is predicted, length-grouped batches, periodic checkpoints and dev scoring, ``--resume``,
deterministic for a seed."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from service.decoding import LabelCodec
from service.evaluation import scores
from service.labels import LABEL_SETS
from service.spec import Demonstrations, LabelSetSpec, ServingSpec
from training.config import TrainConfig
from training.examples import Example


def batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar length (less padding), deterministic for (seed, epoch)."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = batch_size * 32
    out = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: examples[i].length)
        out.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    rng.shuffle(out)
    return out


def _padded(length: int, multiple: int = 32) -> int:
    # A bounded set of shapes: CPU kernels (oneDNN) are built and cached per shape, and with
    # every batch a new length that cache grows without bound and steps slow down.
    return -(-length // multiple) * multiple


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded inputs; ``positions`` are where a target token is predicted (the position
    before it), ``targets`` the tokens there."""
    seqs = [list(e.prompt_ids) + list(e.target_ids[:-1]) for e in examples]
    width = _padded(max(len(s) for s in seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    for i, (seq, e) in enumerate(zip(seqs, examples)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for j, token in enumerate(e.target_ids):
            rows.append(i)
            cols.append(len(e.prompt_ids) - 1 + j)
            targets.append(token)
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "rows": torch.tensor(rows),
        "cols": torch.tensor(cols),
        "targets": torch.tensor(targets),
    }


def _parts(model: Any) -> tuple[Any, Any]:
    """The decoder stack and the LM head under a (peft-wrapped) causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.lm_head


def target_loss(model: Any, batch: dict[str, torch.Tensor], autocast: bool) -> torch.Tensor:
    decoder, head = _parts(model)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = decoder(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).last_hidden_state
        # Logits only where a target is predicted: the vocabulary projection of every position
        # would cost more than the adapted layers themselves.
        logits = head(hidden[batch["rows"].to(device), batch["cols"].to(device)])
    return torch.nn.functional.cross_entropy(logits.float(), batch["targets"].to(device))


@torch.no_grad()
def score_examples(
    model: Any, examples: Sequence[Example], codec: LabelCodec, batch_size: int, autocast: bool
) -> list[str]:
    """Predicted label of each example: the argmax over the labels' first tokens at the last
    prompt position (the serving engine's first-token rule)."""
    decoder, head = _parts(model)
    device = next(model.parameters()).device
    firsts = torch.tensor([c[0] for c in codec.continuations], device=device)
    was_training = model.training
    model.eval()
    predicted = []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    by_index: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [examples[i].prompt_ids for i in idx]
        width = _padded(max(len(s) for s in seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            last = hidden[torch.arange(len(seqs), device=device), mask.sum(1).to(device) - 1]
            logits = head(last).float()[:, firsts]
        for r, i in enumerate(idx):
            by_index[i] = codec.labels[int(logits[r].argmax())]
    predicted = [by_index[i] for i in range(len(examples))]
    model.train(was_training)
    return predicted


def dev_scores(
    model: Any, groups: dict[str, list[Example]], codecs: dict[str, LabelCodec], config: TrainConfig
) -> dict[str, Any]:
    """Weighted F1 per label set and their unweighted mean (``dev_weighted_f1``, the selection
    metric: each dataset counts the same, whatever its dev size)."""
    per_set = {}
    for name, group in groups.items():
        predicted = score_examples(model, group, codecs[name], max(16, 2 * config.batch_size), config.autocast_bf16)
        result = scores([e.label for e in group], predicted, codecs[name].labels)
        per_set[name] = {k: result[k] for k in ("weighted_f1", "accuracy", "predicted_counts")}
    mean = sum(v["weighted_f1"] for v in per_set.values()) / len(per_set)
    out: dict[str, Any] = {"dev_weighted_f1": mean, "dev_per_label_set": per_set}
    if len(per_set) == 1:
        [only] = per_set.values()
        out.update(dev_accuracy=only["accuracy"], dev_predicted=only["predicted_counts"])
    return out


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    warmup = max(1, int(total * warmup_ratio))
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


def save_checkpoint(out: Path, model: Any, optimizer: Any, step: int, config: TrainConfig, history: list[dict]) -> Path:
    folder = out / f"checkpoint-{step:06d}"
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "history.json").write_text(json.dumps(history, indent=1))
    spec_for(config).save(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def spec_for(config: TrainConfig) -> ServingSpec:
    """The erc.json of a run's adapter: every label set it was trained on, each with the window
    and demonstrations its examples had; the first dataset's is the default."""
    label_sets = {}
    for part, _ in config.parts():
        demos = part.demonstrations
        label_sets[part.dataset] = LabelSetSpec(
            window=part.window, demonstrations=Demonstrations(k=demos.k if demos.enabled else 0, index=demos.index)
        )
    default = "meld" if "meld" in label_sets else next(iter(label_sets))
    # base_model is "embedded", a committed adapter's name (trained on top of it) or a folder path.
    base = None if config.base_model == "embedded" or "/" in config.base_model else config.base_model
    return ServingSpec(
        label_sets=label_sets,
        default_label_set=default,
        model_name=config.name,
        base_adapter=base,
        backbone=config.backbone,
    )


def start_from(model: Any, adapter: Path) -> None:
    """Load a committed adapter's LoRA weights into ``model`` (already LoRA-wrapped with the same
    shape); refuses an adapter that leaves any of the model's LoRA weights unset."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no adapter_model.safetensors in {adapter}")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"adapter {adapter} does not fit this config's LoRA: "
            f"{len(missing)} weights missing, {len(result.unexpected_keys)} unexpected"
        )


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(
        p for p in out.glob("checkpoint-*") if not p.name.endswith(".tmp") and (p / "trainer_state.pt").is_file()
    )
    return found[-1] if found else None


def train(
    config: TrainConfig,
    model: Any,
    tokenizer: Any,
    train_examples: Sequence[Example],
    dev_examples: Sequence[Example],
    out: Path,
    resume: bool = False,
    log: Any = print,
) -> dict:
    """Train ``model`` (already LoRA-wrapped) and return the run summary. Checkpoints and
    ``history.json`` go to ``out``; the best dev checkpoint is copied to ``out/best``."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    per_epoch = batches(train_examples, config.batch_size, config.seed, 0)
    total = config.max_steps or max(1, math.ceil(len(per_epoch) * config.epochs) - config.skip_steps)
    step, history = 0, []
    if resume and (ckpt := latest_checkpoint(out)):
        start_from(model, ckpt)
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        step = state["step"]
        history = json.loads((ckpt / "history.json").read_text())
        log(f"resumed from {ckpt} at step {step}/{total}")
    # Dev examples of a mixed run are scored per label set; selection uses their mean.
    dev_groups: dict[str, list[Example]] = {}
    for e in dev_examples:
        dev_groups.setdefault(e.label_set or config.dataset, []).append(e)
    codecs = {name: LabelCodec.build(tokenizer, LABEL_SETS[name]) for name in dev_groups}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    best = max((h["dev_weighted_f1"] for h in history if "dev_weighted_f1" in h), default=-1.0)
    started = time.monotonic()
    model.train()
    bar = tqdm(total=total, initial=step, desc=config.name, dynamic_ncols=True)
    running = None
    while step < total:
        epoch, within = divmod(config.skip_steps + step, len(per_epoch))
        order = batches(train_examples, config.batch_size, config.seed, epoch)
        batch = collate([train_examples[i] for i in order[within]], pad)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, config.learning_rate, config.warmup_ratio)
        loss = target_loss(model, batch, config.autocast_bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        record = {
            "step": step,
            "loss": loss.item(),
            "tokens": int(batch["attention_mask"].sum()),
            "elapsed_s": round(time.monotonic() - started, 1),
        }
        out_of_time = config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes
        # Without dev examples (the ablation scores every arm on all of dev itself) nothing is selected here.
        if dev_examples and (step % config.eval_every == 0 or step == total or out_of_time):
            record.update(dev_scores(model, dev_groups, codecs, config))
            per_set = ", ".join(f"{k} {v['weighted_f1']:.2f}" for k, v in record["dev_per_label_set"].items())
            log(f"step {step}: dev weighted F1 {record['dev_weighted_f1']:.2f} ({per_set}) on {len(dev_examples)}")
        history.append(record)
        if step % config.checkpoint_every == 0 or "dev_weighted_f1" in record or step == total:
            folder = save_checkpoint(out, model, optimizer, step, config, history)
            if record.get("dev_weighted_f1", -1) > best:
                best = record["dev_weighted_f1"]
                import shutil

                shutil.rmtree(out / "best", ignore_errors=True)
                shutil.copytree(folder, out / "best", ignore=shutil.ignore_patterns("trainer_state.pt"))
                (out / "best" / "selected.json").write_text(json.dumps({"step": step, "dev_weighted_f1": best}))
        if out_of_time:
            log(f"time budget of {config.max_minutes} min reached at step {step}/{total}")
            break
    bar.close()
    summary = {
        "config": config.model_dump(),
        "steps": step,
        "total_steps": total,
        "best_dev_weighted_f1": best,
        "train_examples": len(train_examples),
        "wall_s": round(time.monotonic() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
