"""Training: task builders, one step on a tiny random Llama, merge round trip, GPU recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.data import Dialogue, Turn
from service.labels import LABEL_SETS
from service.spec import ServingSpec
from service.templates import Shown
from training.config import TrainConfig
from training.examples import build_examples, retrieve_demonstrations
from training.trainer import batches, collate, target_loss
from tests.conftest import require

CONFIGS = Path(__file__).resolve().parent.parent / "training" / "configs"
DIALOGUE = Dialogue("d1", (Turn("Ann", "I won!", "joyful"), Turn("Bob", "No way.", "surprise")))
HEAD = "Now you are expert of sentiment and emotional analysis. "
MELD_Q = "from <neutral, surprise, fear, sad, joyful, disgust, angry>:"


@pytest.fixture(scope="module")
def tokenizer(settings):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(require(settings.weights_root / "base", "run `erc weights build`")))


#: The sizes of the tiny models the merge tests build (any architecture).
TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=3,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **TINY,
    )
    return LlamaForCausalLM(config)


def tiny_gemma(tokenizer, seed: int = 0):
    """Gemma 3's text model: one sliding and one full attention layer, so one rope per type."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        **TINY,
    )
    return Gemma3ForCausalLM(config)


def test_three_task_builders_golden(tokenizer):
    shown = {("d1", 1): [Shown("Wow!", "surprise")]}
    examples = build_examples([DIALOGUE], "meld", tokenizer, ["erc", "speaker", "prediction"], 12, shown, 1024)
    by_task = {(e.task, e.turn): e for e in examples}
    assert len(examples) == 6
    erc = by_task[("erc", 1)]
    assert tokenizer.decode(erc.prompt_ids) == (
        HEAD + "The following conversation noted between '### ###' involves several speakers. ### "
        '\t Speaker_0:"I won!"\t Speaker_1:"No way." ### Similar utterances from other conversations: '
        '"Wow!" is surprise. Please select the emotional label of < Speaker_1:"No way."> ' + MELD_Q
    )
    assert erc.target_ids == (*tokenizer(" surprise", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id)
    speaker = by_task[("speaker", 1)]
    assert tokenizer.decode(speaker.prompt_ids) == (
        HEAD + "Please select the Speaker label of the utterance <Speaker: No way.> from <Speaker_0, "
        "Speaker_1, Speaker_2, Speaker_3, Speaker_4, Speaker_5, Speaker_6, Speaker_7, Speaker_8>:"
    )
    assert tokenizer.decode(speaker.target_ids, skip_special_tokens=True) == " Speaker_1"
    prediction = by_task[("prediction", 1)]
    text = tokenizer.decode(prediction.prompt_ids)
    main, predict = text.split("***")
    assert main == tokenizer.decode(erc.prompt_ids)
    assert predict == (
        HEAD + "The following conversation noted between '### ###' involves several speakers. ### "
        '\t Speaker_0:"I won!"###Based on the above historical utterances, next utterance is spoken by <1>, '
        "please predict the emotion states of <1> " + MELD_Q
    )
    assert prediction.target_ids == erc.target_ids


def test_same_label_demonstrations_prefer_the_gold_label_then_fill_with_the_nearest(meld_index):
    """The opt-in ablation: the nearest pool utterances with the utterance's gold label first;
    where fewer than k share it, the nearest others fill in, in their order."""
    pool_dialogue = meld_index.pool[0].dialogue_id
    text = meld_index.pool[0].text
    plain = retrieve_demonstrations([Dialogue(pool_dialogue, (Turn("a", text, "joyful"),))], meld_index, 5, True)
    differ = []
    for gold in LABEL_SETS["meld"]:
        utterance = Dialogue(pool_dialogue, (Turn("a", text, gold),))
        [shown] = retrieve_demonstrations([utterance], meld_index, 5, True, same_label=True).values()
        [deep] = meld_index.search([text], 16 * 5, [pool_dialogue])
        same = [x.text for x in deep if x.label == gold][:5]
        others = [x.text for x in deep if x.label != gold][: 5 - len(same)]
        assert [s.text for s in shown] == same + others and len(shown) == 5
        assert all(s.label == gold for s in shown[: len(same)])
        differ.append([s.text for s in shown] != [s.text for s in plain[(pool_dialogue, 0)]])
    assert any(differ), "the gold label changed no utterance's demonstrations"


def test_long_prompts_lose_the_oldest_history_first(tokenizer):
    long = Dialogue("x", tuple(Turn(f"S{i % 2}", "word " * 50, "neutral") for i in range(13)))
    [example] = [e for e in build_examples([long], "meld", tokenizer, ["erc"], 12, {}, 300) if e.turn == 12]
    assert example.length <= 300
    assert tokenizer.decode(example.prompt_ids).startswith(HEAD)


def test_demonstrations_exclude_own_dialogue_and_ignore_gold_labels(meld_index):
    pool_dialogue = meld_index.pool[0].dialogue_id
    text = meld_index.pool[0].text
    as_joy = Dialogue(pool_dialogue, (Turn("a", text, "joyful"),))
    as_sad = Dialogue(pool_dialogue, (Turn("a", text, "sad"),))
    joy = retrieve_demonstrations([as_joy], meld_index, 5, own_split=True)
    sad = retrieve_demonstrations([as_sad], meld_index, 5, own_split=True)
    assert joy == sad  # chosen by the text alone, never by the gold label
    own_texts = {p.text for p in meld_index.pool if p.dialogue_id == pool_dialogue}
    assert len(joy[(pool_dialogue, 0)]) == 5
    assert not {s.text for s in joy[(pool_dialogue, 0)]} & own_texts - {
        p.text for p in meld_index.pool if p.dialogue_id != pool_dialogue
    }


def test_batches_are_deterministic_for_a_seed(tokenizer):
    examples = build_examples([DIALOGUE] * 10, "meld", tokenizer, ["erc"], 12, {}, 1024)
    assert batches(examples, 4, 7, 0) == batches(examples, 4, 7, 0)
    assert batches(examples, 4, 7, 0) != batches(examples, 4, 8, 0)
    assert sorted(i for b in batches(examples, 4, 7, 0) for i in b) == list(range(len(examples)))


def test_one_training_step_lowers_the_loss(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(tokenizer),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], layers_to_transform=[1, 2]),
    )
    examples = build_examples([DIALOGUE], "meld", tokenizer, ["erc"], 12, {}, 1024)
    batch = collate(examples, tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = target_loss(model, batch, autocast=False)
    before.backward()
    optimizer.step()
    after = target_loss(model, batch, autocast=False)
    assert after.item() < before.item()
    # Only adapter weights train; the loss sees only the target tokens (2 per example).
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert len(batch["targets"]) == sum(len(e.target_ids) for e in examples)


def test_merge_round_trip(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from training.weights import merge_adapter

    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    base = tiny_llama(tokenizer)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    config = json.loads((base_dir / "config.json").read_text())
    config["rope_theta"] = 10000.0
    (base_dir / "config.json").write_text(json.dumps(config))
    peft_model = get_peft_model(
        tiny_llama(tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(adapter_dir)
    ServingSpec(model_name="tiny").save(adapter_dir)
    merge_adapter(base_dir, adapter_dir, merged_dir)

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    ids = torch.tensor([tokenizer("Hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        got = merged.eval()(ids).logits
        plain = tiny_llama(tokenizer).eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter did change the model
    assert ServingSpec.load(merged_dir).model_name == "tiny"
    assert json.loads((merged_dir / "config.json").read_text())["rope_theta"] == 10000.0


def test_merge_keeps_gemma3s_rope_per_attention_type(tokenizer, tmp_path):
    """Gemma 3 keeps one rope per attention type (sliding and full layers) and no flat
    rope_theta: the merge must carry that over as the base has it, not require the flat key."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.weights import merge_adapter

    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    tiny_gemma(tokenizer).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    base_config = json.loads((base_dir / "config.json").read_text())
    assert "rope_theta" not in base_config and len(base_config["rope_parameters"]) == 2
    peft_model = get_peft_model(
        tiny_gemma(tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(adapter_dir)
    ServingSpec(model_name="tiny-gemma", backbone="gemma3-270m").save(adapter_dir)
    merge_adapter(base_dir, adapter_dir, merged_dir)

    merged_config = json.loads((merged_dir / "config.json").read_text())
    assert merged_config["rope_parameters"] == base_config["rope_parameters"]
    assert "rope_theta" not in merged_config
    assert ServingSpec.load(merged_dir).backbone == "gemma3-270m"
    ids = torch.tensor([tokenizer("Hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        expected = peft_model.eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_a_backbone_run_names_its_backbone_and_merges_into_it(tmp_path):
    from pydantic import ValidationError

    from service.served_model import WeightsError
    from training.trainer import spec_for
    from training.weights import merge_base

    config = TrainConfig.load(CONFIGS / "study.toml").model_copy(update={"name": "s", "backbone": "gemma3-270m"})
    spec = spec_for(config)
    assert spec.backbone == "gemma3-270m" and spec.base_adapter is None
    assert set(spec.label_sets) == {"meld", "iemocap", "emorynlp"}
    assert spec_for(config.model_copy(update={"backbone": None})).backbone is None
    with pytest.raises(ValidationError, match="backbone or base_model"):
        TrainConfig(name="x", backbone="gemma3-270m", base_model="smollm2-meld-full")

    root = tmp_path / "weights"
    for name, backbone in (("on-gemma", "gemma3-270m"), ("on-nothing", "no-such-backbone")):
        folder = root / "adapters" / name
        folder.mkdir(parents=True)
        ServingSpec(model_name=name, backbone=backbone).save(folder)
    assert merge_base(root, root / "adapters" / "on-gemma") == root / "gemma3-270m-base"
    with pytest.raises(WeightsError, match="unknown backbone 'no-such-backbone'"):
        merge_base(root, root / "adapters" / "on-nothing")


def _calibration(n: int, bias: float, where: str):
    from service.spec import Calibration

    return Calibration(bias=[bias] * n, temperature=1.5, fitted_on=where)


def test_int8_build_rounds_each_projection_per_channel_and_serves_its_own_calibration(tokenizer, tmp_path):
    from safetensors.torch import load_file

    from service.spec import LabelSetSpec
    from service.served_model import adapter_of
    from training.weights import WeightsError, quantize_int8
    from training.evaluate import store_calibration

    model_dir, out = tmp_path / "tiny", tmp_path / "tiny-int8"
    tiny_llama(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    n_meld, n_iemocap = len(LABEL_SETS["meld"]), len(LABEL_SETS["iemocap"])
    ServingSpec(
        model_name="tiny",
        label_sets={
            "meld": LabelSetSpec(
                calibration=_calibration(n_meld, 0.1, "float"), calibration_int8=_calibration(n_meld, 0.2, "int8")
            ),
            "iemocap": LabelSetSpec(calibration=_calibration(n_iemocap, 0.3, "float")),
        },
    ).save(model_dir)
    quantize_int8(model_dir, out)

    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    projections = [k for k in before if k.split(".")[-2].endswith("_proj")]
    assert len(projections) == 3 * 7
    for key in before:
        if key in projections:
            q, scale = after[key], after[key.removesuffix("weight") + "weight_scale"]
            assert q.dtype == torch.int8 and scale.shape == (q.shape[0], 1)
            assert int(q.abs().amax(dim=1).min()) == 127  # each row uses the whole int8 range
            # Rounding to the nearest step: no weight moves by more than half its row's step.
            assert bool(((q.float() * scale - before[key]).abs() <= scale / 2 + 1e-7).all()), key
        else:
            assert torch.equal(after[key], before[key]), key  # embeddings and norms stay float
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"

    spec = ServingSpec.load(out)
    assert spec.quantization == "int8" and spec.precision("float32") == "int8"
    assert ServingSpec.load(model_dir).precision("float32") == "float32"
    assert spec.model_name == "tiny-int8" and adapter_of(out) == "tiny"
    assert spec.label_sets["meld"].calibration.fitted_on == "int8"
    assert spec.label_sets["iemocap"].calibration.fitted_on == "float"  # none fitted: the float one
    with pytest.raises(WeightsError, match="already quantized"):
        quantize_int8(out, tmp_path / "again")

    # `erc calibrate` of the int8 build: its own erc.json serves the fit, the adapter keeps it apart.
    spec.label_sets["iemocap"].calibration = _calibration(n_iemocap, 0.4, "int8 refit")
    store_calibration(spec, out, [model_dir])
    adapter = ServingSpec.load(model_dir).label_sets["iemocap"]
    assert adapter.calibration.fitted_on == "float" and adapter.calibration_int8.fitted_on == "int8 refit"
    assert ServingSpec.load(out).label_sets["iemocap"].calibration.fitted_on == "int8 refit"


def test_int8_build_takes_its_calibration_from_the_committed_adapter(tokenizer, tmp_path):
    """A merge built before the adapter's ``calibration_int8`` was fitted (or pulled) carries
    none: `erc weights build --int8` must still serve the adapter's, and rebuild when it moves."""
    from service.spec import LabelSetSpec
    from training.weights import build_all

    root = tmp_path / "weights"
    (root / "base").mkdir(parents=True)
    ServingSpec(model_name="base").save(root / "base")
    adapter, merged = root / "adapters" / "tiny", root / "tiny"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    n = len(LABEL_SETS["meld"])
    float_only = ServingSpec(
        model_name="tiny", label_sets={"meld": LabelSetSpec(calibration=_calibration(n, 0.1, "float"))}
    )
    tiny_llama(tokenizer).save_pretrained(merged)
    float_only.save(merged)  # the merge, built before int8 was calibrated
    float_only.label_sets["meld"].calibration_int8 = _calibration(n, 0.2, "int8")
    float_only.save(adapter)

    lines = build_all(root, int8=True)
    assert lines[-1] == f"int8     {root / 'tiny-int8'}", lines
    assert ServingSpec.load(root / "tiny-int8").label_sets["meld"].calibration.fitted_on == "int8"
    assert build_all(root, int8=True)[-1] == f"present  {root / 'tiny-int8'}"
    float_only.label_sets["meld"].calibration_int8 = _calibration(n, 0.3, "int8 refit")
    float_only.save(adapter)
    assert build_all(root, int8=True)[-1].startswith("int8     ")
    assert ServingSpec.load(root / "tiny-int8").label_sets["meld"].calibration.fitted_on == "int8 refit"


def test_served_only_build_touches_only_the_served_chain_and_can_drop_its_sources(tmp_path):
    """What the image runs (Dockerfile: `erc weights build --served-only --drop-sources`): the
    served adapter and what it is merged from, nothing else; then only the served merge stays."""
    from training.weights import WeightsError, build_all, served_chain

    root = tmp_path / "weights"
    for name, base_adapter in (("base", None), ("parent", None), ("child", "parent"), ("other", None)):
        (root / name).mkdir(parents=True)
        ServingSpec(model_name=name).save(root / name)  # merged already: nothing to convert here
        if name != "base":
            (root / "adapters" / name).mkdir(parents=True)
            (root / "adapters" / name / "adapter_config.json").write_text("{}")
            ServingSpec(model_name=name, base_adapter=base_adapter).save(root / "adapters" / name)
    (root / "gguf").mkdir()

    assert [a.name for a in served_chain(root, "child")] == ["parent", "child"]
    lines = build_all(root, model="child", served_only=True, drop_sources=True)
    assert not [line for line in lines if "other" in line], lines
    assert sorted(p.name for p in root.iterdir()) == ["adapters", "child", "other"], lines
    with pytest.raises(WeightsError, match="'nope' is not a committed adapter"):
        served_chain(root, "nope")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_shipped_configs_parse(name):
    config = TrainConfig.load(CONFIGS / name)
    assert set(config.tasks) <= {"erc", "speaker", "prediction"}


def test_gpu_recipe_dry_run_on_a_tiny_llama(tokenizer):
    """The 7B recipe with the paper's settings, one optimizer step on a tiny random Llama."""
    from peft import LoraConfig, get_peft_model

    config = TrainConfig.load(CONFIGS / "llama2-7b-meld.toml")
    assert (config.lora.rank, config.lora.alpha, config.lora.dropout) == (16, 16, 0.05)
    assert (config.learning_rate, config.max_length, config.dtype) == (2e-4, 1024, "bfloat16")
    assert set(config.tasks) == {"erc", "speaker", "prediction"}
    model = get_peft_model(
        tiny_llama(tokenizer).to(torch.bfloat16),
        LoraConfig(
            r=config.lora.rank,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
        ),
    )
    examples = build_examples([DIALOGUE], config.dataset, tokenizer, config.tasks, config.window, {}, config.max_length)
    batch = collate(examples[: config.batch_size], tokenizer.eos_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    loss = target_loss(model, batch, autocast=False)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)


def test_checkpoints_resume_and_best_dev_selection(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from training.trainer import train

    dialogues = [Dialogue(f"d{i}", DIALOGUE.turns) for i in range(8)]
    examples = build_examples(dialogues, "meld", tokenizer, ["erc"], 12, {}, 1024)
    config = TrainConfig(
        name="tiny",
        epochs=1,
        batch_size=4,
        checkpoint_every=1,
        eval_every=2,
        eval_examples=4,
        autocast_bf16=False,
        learning_rate=1e-2,
    )

    def fresh():
        return get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    full = train(config, fresh(), tokenizer, examples, examples[:4], tmp_path / "full", log=lambda *_: None)
    assert full["steps"] == full["total_steps"] == 4
    # A zero time budget stops after the first step (with a checkpoint); resuming finishes the
    # run with the same adapter as the uninterrupted one.
    out = tmp_path / "resumed"
    calls: list[str] = []
    stopped = train(
        config.model_copy(update={"max_minutes": 0.0}),
        fresh(),
        tokenizer,
        examples,
        examples[:4],
        out,
        log=calls.append,
    )
    assert stopped["steps"] == 1 and any("time budget" in c for c in calls)
    resumed = train(config, fresh(), tokenizer, examples, examples[:4], out, resume=True, log=calls.append)
    assert any("resumed from" in c for c in calls) and resumed["steps"] == 4
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "checkpoint-000004" / "adapter_model.safetensors"))
    b = load_file(str(out / "checkpoint-000004" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (out / "best" / "selected.json").is_file() and list(ServingSpec.load(out / "best").label_sets) == ["meld"]


def test_a_warm_start_loads_the_adapter_and_trains_on_the_batches_after_the_skipped_ones(
    tokenizer, tmp_path, monkeypatch
):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from training.trainer import start_from, train

    dialogues = [Dialogue(f"d{i}", DIALOGUE.turns) for i in range(8)]
    examples = build_examples(dialogues, "meld", tokenizer, ["erc"], 12, {}, 1024)
    config = TrainConfig(name="tiny", batch_size=4, checkpoint_every=1, eval_every=100, autocast_bf16=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    first = train(
        config.model_copy(update={"max_steps": 1}),
        get_peft_model(tiny_llama(tokenizer), lora),
        tokenizer,
        examples,
        [],
        tmp_path / "first",
        log=lambda *_: None,
    )
    assert first["steps"] == 1
    saved = tmp_path / "first" / "checkpoint-000001"

    # The adapter's weights, not the fresh LoRA's, are what the next run starts from.
    model = get_peft_model(tiny_llama(tokenizer, seed=1), lora)
    start_from(model, saved)
    from safetensors.torch import load_file

    stored = load_file(str(saved / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert stored.keys() == loaded.keys() and all(torch.equal(stored[k], loaded[k]) for k in stored)

    # It trains on the first epoch's order after the skipped batch, never on the skipped one.
    import training.trainer

    trained: list[int] = []
    position = {id(e): i for i, e in enumerate(examples)}

    def collating(batch, pad):
        trained.extend(position[id(e)] for e in batch)
        return collate(batch, pad)

    monkeypatch.setattr(training.trainer, "collate", collating)
    order = batches(examples, 4, 0, 0)
    second = train(
        config.model_copy(update={"skip_steps": 1, "max_steps": 1}), model, tokenizer, examples, [], tmp_path / "second"
    )
    assert second["steps"] == 1 and sorted(trained) == sorted(order[1]) and not set(trained) & set(order[0])

    # An adapter of another shape is refused, naming it.
    other = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="does not fit"):
        start_from(other, saved)


def _handmade_cache(path: Path, settings, limit: int, k: int = 3) -> None:
    """A demonstrations cache for the first ``limit`` MELD train dialogues (and limit // 4 dev),
    with demonstrations that retrieval would never return, so the test can tell where they came from."""
    from service.data import load_split

    def rows(dialogues):
        return [[d.id, t, [[f"cached {d.id}/{t}", "fear"]] * k] for d in dialogues for t in range(len(d.turns))]

    train = load_split(settings.data_dir, "meld", "train", "csv")[:limit]
    dev = load_split(settings.data_dir, "meld", "valid", "csv")[: max(1, limit // 4)]
    key = {"dataset": "meld", "source": "csv", "index": "meld", "k": k}
    path.write_text(json.dumps({"key": key, "index_checksum": None, "train": rows(train), "valid": rows(dev)}))


def test_demonstrations_cache_is_used_only_when_it_matches(settings, data_dir, tmp_path):
    from training.run import load_corpus

    cache = tmp_path / "demos.json"
    _handmade_cache(cache, settings, limit=4)
    no_index = settings.model_copy(update={"index_root": tmp_path / "no-index"})
    config = TrainConfig(name="t", demonstrations={"k": 3})
    corpus = load_corpus(config, no_index, limit=4, cache=cache)
    first = corpus.train[0]
    assert corpus.train_demos[(first.id, 0)] == [Shown(f"cached {first.id}/0", "fear")] * 3
    assert set(corpus.dev_demos) == {(d.id, t) for d in corpus.dev for t in range(len(d.turns))}
    # Another k, or dialogues the cache lacks: retrieval is needed, and without an index it fails loudly.
    with pytest.raises(Exception, match="index|manifest|no-index"):
        load_corpus(
            config.model_copy(update={"demonstrations": config.demonstrations.model_copy(update={"k": 2})}),
            no_index,
            limit=4,
            cache=cache,
        )
    with pytest.raises(Exception, match="index|manifest|no-index"):
        load_corpus(config, no_index, limit=8, cache=cache)


def test_ablation_trains_every_arm_on_the_same_token_budget(settings, data_dir, tokenizer, tmp_path):
    from service.data import load_split
    from training.ablation import ablate

    base = tmp_path / "tiny"
    tiny_llama(tokenizer).save_pretrained(str(base))
    tokenizer.save_pretrained(str(base))
    cache = tmp_path / "demos.json"
    _handmade_cache(cache, settings, limit=4)
    config = TrainConfig(
        name="abl",
        base_model=str(base),
        batch_size=4,
        autocast_bf16=False,
        lora={"rank": 4, "alpha": 8, "top_layers": None, "target_modules": ["q_proj", "v_proj"]},
    )
    budget = 6000
    rows = ablate(
        config,
        settings.model_copy(update={"index_root": tmp_path / "no-index"}),
        budget,
        ["erc", "all"],
        tmp_path / "out",
        limit=4,
        demonstrations_cache=cache,
    )
    assert [r["arm"] for r in rows] == ["erc", "all"]
    assert (
        rows[1]["tasks"] == ["erc", "speaker", "prediction"]
        and rows[1]["demonstrations"]
        and not rows[0]["demonstrations"]
    )
    for row, name in zip(rows, ["abl-erc", "abl-all"]):
        history = json.loads(next((tmp_path / "out" / name).glob("checkpoint-*/history.json")).read_text())
        trained = sum(h["tokens"] for h in history)
        biggest = max(h["tokens"] for h in history)
        assert budget <= trained < budget + biggest, (row["arm"], trained)
        assert row["dev_count"] == sum(len(d.turns) for d in load_split(settings.data_dir, "meld", "valid", "csv")[:1])
        assert 0 <= row["dev_weighted_f1"] <= 100
    table = (tmp_path / "out" / "ablation.md").read_text()
    assert "| erc | erc | no |" in table and "| all | erc, speaker, prediction | yes |" in table
    with pytest.raises(ValueError, match="unknown arms"):
        ablate(config, settings, budget, ["erc", "bogus"], tmp_path / "x", limit=4, demonstrations_cache=cache)


def test_mixed_run_keeps_each_datasets_label_set_window_and_index():
    config = TrainConfig.load(CONFIGS / "smollm2-erc3.toml")
    parts = {part.dataset: (part, cap) for part, cap in config.parts()}
    assert set(parts) == {"meld", "iemocap", "emorynlp"}
    assert parts["iemocap"][0].source == "cosmic" and parts["emorynlp"][0].source == "csv"
    assert parts["meld"][0].window == 12 and parts["iemocap"][0].window == config.window
    assert all(part.demonstrations.index == name for name, (part, _) in parts.items())
    assert parts["meld"][1] == 2000 and parts["iemocap"][1] is None
    from training.trainer import spec_for

    spec = spec_for(config)
    assert spec.default_label_set == "meld" and spec.base_adapter == "smollm2-meld-full"
    assert {n: (e.window, e.demonstrations.index) for n, e in spec.label_sets.items()} == {
        n: (p.window, p.demonstrations.index) for n, (p, _) in parts.items()
    }


def test_mixed_examples_are_scored_per_label_set(tokenizer, tmp_path):
    """Dev selection of a mixed run: weighted F1 per label set, each counted the same."""
    from peft import LoraConfig, get_peft_model

    from training.trainer import train

    iemocap = Dialogue("i1", (Turn("M", "I lost it all.", "sad"), Turn("F", "Oh no.", "frustrated")))
    examples = build_examples([DIALOGUE] * 4, "meld", tokenizer, ["erc"], 12, {}, 1024) + build_examples(
        [iemocap] * 4, "iemocap", tokenizer, ["erc"], 12, {}, 1024
    )
    assert {e.label_set for e in examples} == {"meld", "iemocap"}
    assert all(("<happy, sad" in tokenizer.decode(e.prompt_ids)) == (e.label_set == "iemocap") for e in examples)
    config = TrainConfig(name="mixed", epochs=1, batch_size=4, eval_every=2, eval_examples=8, autocast_bf16=False)
    model = get_peft_model(tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    train(config, model, tokenizer, examples, examples, tmp_path, log=lambda *_: None)
    history = json.loads((tmp_path / "checkpoint-000002" / "history.json").read_text())
    scored = [h for h in history if "dev_per_label_set" in h][-1]
    per_set = scored["dev_per_label_set"]
    assert set(per_set) == {"meld", "iemocap"}
    assert scored["dev_weighted_f1"] == pytest.approx(
        (per_set["meld"]["weighted_f1"] + per_set["iemocap"]["weighted_f1"]) / 2
    )
    assert set(per_set["iemocap"]["predicted_counts"]) <= set(LABEL_SETS["iemocap"])


def test_stacked_adapters_merge_in_order_and_the_default_is_named(tmp_path):
    from service.spec import Demonstrations, LabelSetSpec
    from service.served_model import WeightsError, adapters, default_model_dir
    from training.weights import merge_base

    root = tmp_path / "weights"
    for name, base in (("a-top", "z-bottom"), ("z-bottom", None)):
        folder = root / "adapters" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        ServingSpec(
            label_sets={"meld": LabelSetSpec(demonstrations=Demonstrations(k=0))}, model_name=name, base_adapter=base
        ).save(folder)
    assert [p.name for p in adapters(root)] == ["z-bottom", "a-top"]  # the base first, whatever the names
    assert merge_base(root, root / "adapters" / "a-top") == root / "z-bottom"
    assert merge_base(root, root / "adapters" / "z-bottom") == root / "base"
    assert default_model_dir(root) == root / "z-bottom"
    (root / "adapters" / "DEFAULT").write_text("a-top\n")
    assert default_model_dir(root) == root / "a-top"
    (root / "adapters" / "DEFAULT").write_text("gone\n")
    with pytest.raises(WeightsError, match="names 'gone'"):
        default_model_dir(root)


def test_every_committed_figure_table_names_its_precision_and_its_card_quotes_it():
    """The card test (tests/test_service.py) picks a table by the engine's precision: each table
    must say which it was measured in, under the name that precision maps to, and the card beside
    it must quote every test figure."""
    from training.evaluate import scores_file

    tables = sorted((Path(__file__).resolve().parents[1] / "weights" / "adapters").glob("*/scores*.json"))
    assert {"scores.json", "scores-float32.json"} <= {p.name for p in tables}
    for path in tables:
        scores = json.loads(path.read_text())
        assert path.name == scores_file(scores["precision"]), path
        card = (path.parent / "MODEL_CARD.md").read_text()
        for key, figures in scores.items():
            if key.endswith(" test"):
                assert f"{figures['weighted_f1']:.2f}" in card, (path, key)


def test_paired_bootstrap_resamples_whole_dialogues_and_brackets_the_change():
    from training.compare import paired_bootstrap

    labels = ("a", "b")
    gold = ["a", "b"] * 40
    sizes = [4] * 20
    same = paired_bootstrap(gold, gold, gold, sizes, labels, resamples=50)
    assert same["change"] == same["low"] == same["high"] == 0 and same["p_better"] == 0
    # The second model fixes the first's errors in half of the dialogues: better in every draw
    # that holds one of them, and the interval brackets the change.
    wrong = ["b" if i < 40 and i % 4 == 0 else g for i, g in enumerate(gold)]
    better = paired_bootstrap(gold, wrong, gold, sizes, labels, resamples=200)
    assert better["second"] == 100 and better["change"] > 0
    assert 0 <= better["low"] <= better["change"] <= better["high"] and better["p_better"] > 0.95
    worse = paired_bootstrap(gold, gold, wrong, sizes, labels, resamples=200)
    assert worse["change"] == -better["change"] and worse["high"] <= 0
    with pytest.raises(ValueError, match="same utterances"):
        paired_bootstrap(gold, gold, gold[:-1], sizes, labels)


def test_compare_reuses_cached_labels_only_while_the_calibration_is_unchanged(tmp_path, monkeypatch):
    import training.evaluate
    from service.settings import Settings
    from training.compare import _labels_of

    model = tmp_path / "weights" / "m"
    model.mkdir(parents=True)
    (model / "erc.json").write_text('{"calibration": 1}')
    settings = Settings(weights_root=tmp_path / "weights", dtype="float32")
    runs = []

    async def evaluate(model_dir, wanted, *args, **kwargs):
        runs.append(model_dir)
        return [
            {"dataset": name, "labels": ["a", "b"], "precision": "float32", "gold": ["a"], "served": [[0.2, 0.8]],
             "distributions": [[0.6, 0.4]]}
            for name, _, _ in wanted
        ]  # fmt: skip

    monkeypatch.setattr(training.evaluate, "evaluate_async", evaluate)
    first = _labels_of("m", "valid", settings, tmp_path)
    assert runs == [model] and first["meld"]["served"] == ["b"] and first["meld"]["raw"] == ["a"]
    assert _labels_of("m", "valid", settings, tmp_path) == first and len(runs) == 1
    # A new calibration changes the served labels: the cache must not answer for it.
    (model / "erc.json").write_text('{"calibration": 2}')
    _labels_of("m", "valid", settings, tmp_path)
    assert len(runs) == 2
    # A cache without distributions answers only a run that does not need them.
    cache = next(tmp_path.glob("m-valid-*-labels.json"))
    cached = json.loads(cache.read_text())
    stripped = {k: {f: v for f, v in r.items() if f != "distributions"} for k, r in cached.items()}
    cache.write_text(json.dumps(stripped))
    assert _labels_of("m", "valid", settings, tmp_path, distributions=False) == stripped and len(runs) == 2
    _labels_of("m", "valid", settings, tmp_path)
    assert len(runs) == 3


def _lora_adapter(path: Path, rank: int, alpha: int, seed: int, name: str, temperature: float = 1.0) -> Path:
    from safetensors.torch import save_file

    from service.spec import Calibration

    generator = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors = {}
    for layer in (0, 1):
        for module, (out_features, in_features) in {"q_proj": (6, 4), "down_proj": (4, 8)}.items():
            prefix = f"base_model.model.model.layers.{layer}.mlp.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "weights/base",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "down_proj"],
        "layers_to_transform": [0, 1],
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    spec = ServingSpec(model_name=name)
    spec.label_sets["meld"].calibration = Calibration(bias=[0.0] * 7, temperature=temperature, fitted_on="x")
    spec.save(path)
    return path


def _updates(path: Path) -> dict[str, torch.Tensor]:
    """Each module's merged LoRA update, scale * B @ A."""
    from safetensors.torch import load_file

    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {
        key.replace(".lora_A.weight", ""): scale * tensors[key.replace("lora_A", "lora_B")] @ tensors[key]
        for key in tensors
        if ".lora_A." in key
    }


def test_adapter_soup_is_exactly_the_weighted_mean_of_the_updates(tmp_path):
    from training.soup import average_adapters

    first = _lora_adapter(tmp_path / "a", rank=4, alpha=8, seed=1, name="a", temperature=0.9)
    second = _lora_adapter(tmp_path / "b", rank=2, alpha=4, seed=2, name="b", temperature=1.2)
    out = average_adapters([first, second], tmp_path / "soup", shares=[0.25, 0.75])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 12
    got, a, b = _updates(out), _updates(first), _updates(second)
    assert set(got) == set(a) and len(got) == 4
    for key in got:
        assert torch.allclose(got[key], 0.25 * a[key] + 0.75 * b[key], atol=1e-5), key
    spec = ServingSpec.load(out)
    # Neither input's calibration fits the soup: it is calibrated afresh.
    assert spec.model_name == "soup" and spec.label_sets["meld"].calibration is None


def test_adapter_soup_refuses_adapters_that_do_not_average(tmp_path):
    from training.soup import average_adapters

    first = _lora_adapter(tmp_path / "a", rank=4, alpha=8, seed=1, name="a")
    other_scale = _lora_adapter(tmp_path / "b", rank=4, alpha=16, seed=2, name="b")
    with pytest.raises(ValueError, match=r"b: lora_alpha / r is 4.0"):
        average_adapters([first, other_scale], tmp_path / "soup")
    window = _lora_adapter(tmp_path / "c", rank=4, alpha=8, seed=3, name="c")
    spec = ServingSpec.load(window)
    spec.label_sets["meld"].window = 5
    spec.save(window)
    with pytest.raises(ValueError, match=r"c: erc.json differs"):
        average_adapters([first, window], tmp_path / "soup")
    with pytest.raises(ValueError, match="summing to 1"):
        average_adapters([first, first], tmp_path / "soup", shares=[0.5, 0.6])
    assert not (tmp_path / "soup").exists()
