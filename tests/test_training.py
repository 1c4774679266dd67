"""Training: sizes and recipes, the paper's optimizer groups, EBTTrainer (logs, evaluation, gradient accumulation),
the stock Trainer, the time budget, and the errors of `ebt train` on bad input."""

from __future__ import annotations

import hashlib
import json
import math
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from modeling_ebt import EBTConfig, EBTForCausalLM, EBTTokenizer
from modeling_ebt.cli import main
from modeling_ebt.training import (
    MODEL_SIZES,
    RECIPES,
    DescentCollapseError,
    DescentGuard,
    EBTTrainer,
    TimeLimitCallback,
    TrainOptions,
    build_training_arguments,
    ebt_optimizer_groups,
    last_complete_checkpoint,
    load_model_config,
    load_recipe,
)

REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tiny_shakespeare.txt"



def tiny_config(**overrides) -> EBTConfig:
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=65, mcmc_step_size=2.0, mcmc_step_size_lr_multiplier=1.0)
    return EBTConfig(**{**fields, **overrides})


def token_dataset(num_rows: int, length: int = 32, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(97, 123, (num_rows, length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()}).with_format("torch")


def trainer_args(tmp_path, **overrides) -> TrainingArguments:
    fields = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  max_steps=3, learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                  disable_tqdm=True, use_cpu=True, seed=0)
    return TrainingArguments(**{**fields, **overrides})


# --- sizes and recipes ------------------------------------------------------------------------------------------


def test_sizes_and_recipes_are_the_json_files_of_configuration():
    # written once, as data: the package reads the files of configuration/ (installed as modeling_ebt.configuration)
    for name, fields in MODEL_SIZES.items():
        assert json.loads((REPO / "configuration/sizes" / f"{name}.json").read_text()) == fields, name
    for name, recipe in RECIPES.items():
        assert json.loads((REPO / "configuration/recipes" / f"{name}.json").read_text()) == recipe, name
    assert sorted(p.stem for p in (REPO / "configuration/sizes").glob("*.json")) == sorted(MODEL_SIZES)
    assert sorted(p.stem for p in (REPO / "configuration/recipes").glob("*.json")) == sorted(RECIPES)
    assert Path(str(files("modeling_ebt.configuration"))).resolve() == (REPO / "configuration").resolve()


def test_reference_sizes_have_the_papers_shapes():
    shapes = {name: (s["num_hidden_layers"], s["num_attention_heads"], s["hidden_size"], s["intermediate_size"])
              for name, s in MODEL_SIZES.items()}
    assert shapes == {"4xs": (2, 2, 128, 128), "3xs": (4, 4, 256, 256), "xxs": (6, 6, 384, 384),
                      "xs": (12, 6, 384, 384), "small": (12, 12, 768, 768), "medium": (24, 16, 1024, 1024),
                      "large": (24, 16, 1536, 1536), "xl": (24, 32, 2048, 2048)}


def test_load_model_config_applies_recipe_then_size_then_overrides():
    config = load_model_config("xxs", "s1")
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (6, 6, 384)
    assert (config.ebt_type, config.mcmc_num_steps, config.mcmc_step_size) == ("time_embed", 2, 500.0)
    assert config.mcmc_step_size_lr_multiplier == 1500.0
    s2 = load_model_config("4xs", "s2", mcmc_step_size=7.0)
    assert (s2.ebt_type, s2.mcmc_num_steps, s2.randomize_mcmc_num_steps, s2.randomize_mcmc_num_steps_min) == (
        "time_embed", 1, 2, 2)
    assert (s2.langevin_dynamics_noise, s2.mcmc_replay_buffer, s2.truncate_mcmc, s2.no_mcmc_detach) == (
        3.0, True, True, True)
    assert s2.mcmc_step_size == 7.0 and s2.hidden_size == 128
    assert load_model_config(None, "s1").hidden_size == 384  # the recipe's own size
    assert load_model_config(str(REPO / "configuration/sizes/3xs.json")).num_hidden_layers == 4


# The reference's System 2 language job (job_scripts/nlp/pretrain/ebt_s2.sh of github alexiglad/EBT): each flag it
# passes, and for the flags it leaves out the default of its train_model.py, as (reference flag, value, our field).
REFERENCE_S2_MODEL = [
    ("--ebt_type", "time_embed", "ebt_type"),
    ("--mcmc_num_steps", 1, "mcmc_num_steps"),
    ("--randomize_mcmc_num_steps", 2, "randomize_mcmc_num_steps"),
    ("--randomize_mcmc_num_steps_min", 2, "randomize_mcmc_num_steps_min"),
    ("--mcmc_step_size", 5.0, "mcmc_step_size"),
    ("--mcmc_step_size_learnable (not passed)", False, "mcmc_step_size_learnable"),
    ("--mcmc_step_size_lr_multiplier (default)", 5000.0, "mcmc_step_size_lr_multiplier"),
    ("--randomize_mcmc_step_size_scale", 2.0, "randomize_mcmc_step_size_scale"),
    ("--langevin_dynamics_noise", 3.0, "langevin_dynamics_noise"),
    ("--mcmc_replay_buffer", True, "mcmc_replay_buffer"),
    ("--mcmc_replay_buffer_size (default)", 192, "mcmc_replay_buffer_size"),
    ("--mcmc_replay_buffer_sample_bs_percent (default)", 0.5, "mcmc_replay_buffer_sample_fraction"),
    ("--truncate_mcmc", True, "truncate_mcmc"),
    ("--no_mcmc_detach", True, "no_mcmc_detach"),
    ("--contrastive_loss (not passed)", 0.0, "contrastive_loss_coeff"),
    ("--denoising_initial_condition", "random_noise", "denoising_initial_condition"),
    ("--gaussian_random_noise_scaling (default)", 1.0, "gaussian_random_noise_scaling"),
    ("--normalize_initial_condition", True, "normalize_initial_condition"),
    ("--vocab_to_embed_uses_prob_dist (not passed)", False, "vocab_to_embed_uses_prob_dist"),
]
REFERENCE_S2_TRAINING = [
    ("--peak_learning_rate", 1.2e-3, "learning_rate"),
    ("--batch_size_per_device", 32, "per_device_train_batch_size"),
    ("--accumulate_grad_batches", 2, "gradient_accumulation_steps"),
    ("--gradient_clip_val", 1.0, "max_grad_norm"),
    ("--weight_decay", 0.01, "weight_decay"),
    ("--beta1 (default)", 0.9, "adam_beta1"),
    ("--beta2 (default)", 0.999, "adam_beta2"),
    ("--warm_up_steps", 10000, "warmup_steps"),
]


def test_s2_recipe_is_the_references_system_2_job_field_by_field():
    recipe = load_recipe("s2")
    config = load_model_config(None, "s2")
    for flag, value, field in REFERENCE_S2_MODEL:
        assert getattr(config, field) == value, f"{field} should be {value!r} as the reference's {flag}"
    for flag, value, field in REFERENCE_S2_TRAINING:
        assert recipe["training"][field] == value, f"{field} should be {value!r} as the reference's {flag}"
    # --min_lr_scale 10: cosine down to a tenth of the peak; --context_length 256 is ebt train's default block size
    assert recipe["training"]["lr_scheduler_type"] == "cosine_with_min_lr"
    assert recipe["training"]["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    assert recipe["size"] == "xxs"  # the job's model size (RUN_NAME ebt-xxs-...)
    assert set(recipe["model"]) == {field for _, _, field in REFERENCE_S2_MODEL}


def test_the_recipes_batch_applies_unless_batch_size_is_given(tmp_path):
    s2 = load_recipe("s2")
    args = build_training_arguments(TrainOptions(output_dir=str(tmp_path), max_steps=1), s2, 1)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (32, 2)
    args = build_training_arguments(TrainOptions(output_dir=str(tmp_path), max_steps=1, batch_size=4), s2, 1)
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size) == (4, 4)
    args = build_training_arguments(TrainOptions(output_dir=str(tmp_path), max_steps=1), load_recipe("s1"), 1)
    assert args.per_device_train_batch_size == 16  # no batch in the recipe: ebt train's default


def test_recipes_and_sizes_reject_unknown_names_and_fields(tmp_path):
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        load_model_config("huge")
    with pytest.raises(ValueError, match=r"\['not_a_field'\] are not EBTConfig fields"):
        load_model_config("4xs", not_a_field=1)
    bad = tmp_path / "recipe.json"
    bad.write_text(json.dumps({"model": {}, "training": {"learning_rat": 1e-3}}))
    with pytest.raises(ValueError, match="learning_rat.*not TrainingArguments fields"):
        load_recipe(bad)
    bad.write_text(json.dumps({"model": []}))
    with pytest.raises(ValueError, match="'model' must be a JSON object"):
        load_recipe(bad)
    size = tmp_path / "size.json"
    size.write_text("{hidden_size: 64}")
    with pytest.raises(ValueError, match=f"size file {size} is not valid JSON"):
        load_model_config(size)


# --- optimizer groups -------------------------------------------------------------------------------------------


def test_optimizer_groups_put_alpha_alone_with_multiplied_lr_and_no_weight_decay():
    model = EBTForCausalLM(tiny_config(mcmc_step_size_lr_multiplier=1500.0))
    groups = {group["name"]: group for group in ebt_optimizer_groups(model, weight_decay=0.01, learning_rate=1.2e-3)}
    assert set(groups) == {"decay", "no_decay", "alpha"}
    assert groups["alpha"]["params"] == [model.alpha]
    assert groups["alpha"]["lr"] == pytest.approx(1.2e-3 * 1500) and groups["alpha"]["weight_decay"] == 0.0
    assert groups["decay"]["lr"] == groups["no_decay"]["lr"] == 1.2e-3
    assert groups["decay"]["weight_decay"] == 0.01 and groups["no_decay"]["weight_decay"] == 0.0

    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert {"model.embed_tokens.weight", "model.time_embeddings.weight", "model.norm.weight",
            "model.layers.0.input_layernorm.weight"} <= no_decay
    assert {"model.vocab_to_embed.weight", "model.energy_head.weight",
            "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= decay
    assert len(decay) + len(no_decay) + 1 == len(list(model.parameters()))  # every parameter exactly once


def test_optimizer_groups_leave_out_a_frozen_alpha():
    model = EBTForCausalLM(tiny_config(mcmc_step_size_learnable=False))
    groups = ebt_optimizer_groups(model, 0.01, 1e-3)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert all(p is not model.alpha for g in groups for p in g["params"])


def test_ebt_trainer_builds_its_optimizer_from_the_groups(tmp_path):
    model = EBTForCausalLM(tiny_config(mcmc_step_size_lr_multiplier=300.0))
    trainer = EBTTrainer(model=model, args=trainer_args(tmp_path, learning_rate=2e-3, weight_decay=0.05),
                         train_dataset=token_dataset(8), data_collator=default_data_collator)
    optimizer = trainer.create_optimizer()
    by_name = {group["name"]: group for group in optimizer.param_groups}
    assert by_name["alpha"]["lr"] == pytest.approx(0.6) and by_name["alpha"]["weight_decay"] == 0.0
    assert by_name["decay"]["weight_decay"] == 0.05 and by_name["no_decay"]["weight_decay"] == 0.0
    assert isinstance(optimizer, torch.optim.AdamW)


def test_ebt_trainer_takes_a_given_optimizer_class_and_refuses_one_that_makes_its_own_groups(tmp_path):
    model = EBTForCausalLM(tiny_config(mcmc_step_size_lr_multiplier=300.0))
    args = trainer_args(tmp_path, learning_rate=2e-3)
    trainer = EBTTrainer(model=model, args=args, optimizer_cls_and_kwargs=(torch.optim.SGD, {"momentum": 0.5}))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.5
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["alpha"] == pytest.approx(0.6)
    own_groups = (torch.optim.SGD, {"params": list(model.parameters())})  # as GaLore-style optimizers come
    with pytest.raises(ValueError, match="builds its own parameter groups, which would lose α's"):
        EBTTrainer(model=model, args=args, optimizer_cls_and_kwargs=own_groups).create_optimizer()


# --- EBTTrainer: logs, evaluation, accumulation -----------------------------------------------------------------


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason=f"{TINY_SHAKESPEARE} is not on this machine (shared data "
                    "of the development machines and CI)")
def test_ebt_trainer_lowers_validation_loss_on_tiny_shakespeare_and_logs_the_descent(tmp_path):
    from modeling_ebt.data import build_lm_datasets

    data = build_lm_datasets(EBTTokenizer(), TINY_SHAKESPEARE, block_size=64, cache_dir=tmp_path / "cache")
    validation = data["validation"].select(range(32))
    set_seed(0)
    model = EBTForCausalLM(tiny_config(hidden_size=64, intermediate_size=64, mcmc_step_size=5.0,
                                       mcmc_step_size_lr_multiplier=15.0))
    args = trainer_args(tmp_path, max_steps=60, per_device_train_batch_size=16, learning_rate=3e-3,
                        warmup_steps=5, logging_steps=20, prediction_loss_only=True)
    trainer = EBTTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=validation,
                         data_collator=default_data_collator)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    assert after["eval_last_step_loss"] < before["eval_last_step_loss"] - 1.0
    assert after["eval_last_step_loss"] < 3.8  # a uniform guess scores ln 257 ≈ 5.55; measured 3.41
    assert after["eval_perplexity"] == pytest.approx(math.exp(after["eval_last_step_loss"]))
    assert {"eval_loss", "eval_loss_step_1", "eval_loss_step_2", "eval_energy_gap", "eval_alpha"} <= set(after)
    # eval_loss is the prediction's cross-entropy (the last step's), comparable with other models' eval_loss; the
    # training objective (the mean over the steps) is eval_objective
    assert after["eval_loss"] == pytest.approx(after["eval_loss_step_2"], rel=1e-6)
    assert after["eval_objective"] == pytest.approx((after["eval_loss_step_1"] + after["eval_loss_step_2"]) / 2,
                                                    rel=1e-3)
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 3
    for log in train_logs:
        assert {"loss_step_1", "loss_step_2", "last_step_loss", "energy_gap", "alpha"} <= set(log)
        assert log["loss"] == pytest.approx((log["loss_step_1"] + log["loss_step_2"]) / 2, rel=1e-3)
    assert train_logs[-1]["alpha"] == pytest.approx(float(model.alpha.detach()), rel=0.1)


def _train_weights(tmp_path, trainer_class, batch_size, accumulation, training_args=None, **config):
    set_seed(0)
    model = EBTForCausalLM(tiny_config(denoising_initial_condition="zeros", **config))
    args = trainer_args(tmp_path, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                        optim="sgd", max_grad_norm=0.0, learning_rate=0.05, lr_scheduler_type="constant",
                        **(training_args or {}))
    trainer = trainer_class(model=model, args=args, train_dataset=token_dataset(16),
                            data_collator=default_data_collator)
    trainer.train()
    assert model.is_activation_checkpointing == args.activation_checkpointing
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_ebt_trainer_gradient_accumulation_matches_the_full_batch(tmp_path):
    full = _train_weights(tmp_path, EBTTrainer, batch_size=4, accumulation=1)
    accumulated = _train_weights(tmp_path, EBTTrainer, batch_size=2, accumulation=2)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-5, msg=name)


def test_activation_checkpointing_from_training_arguments_reaches_the_same_weights(tmp_path):
    plain = _train_weights(tmp_path, EBTTrainer, batch_size=4, accumulation=1)
    checkpointed = _train_weights(tmp_path, EBTTrainer, batch_size=4, accumulation=1,
                                  training_args=dict(activation_checkpointing=True))
    moved = max(float((plain[name] - checkpointed[name]).abs().max()) for name in plain)
    # the same function rebuilt; only the order in which each step's parameter gradients are summed differs
    assert 0.0 <= moved < 1e-6


def test_a_resumed_system2_run_restores_its_replay_buffer_and_reaches_the_same_weights(tmp_path):
    system2 = dict(mcmc_replay_buffer=True, mcmc_replay_buffer_size=6, randomize_mcmc_num_steps=1,
                   langevin_dynamics_noise=0.2)

    def run(resume_from=None):
        set_seed(0)
        model = EBTForCausalLM(tiny_config(**system2))
        args = trainer_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, optim="sgd",
                            max_grad_norm=0.0, learning_rate=0.05, lr_scheduler_type="constant")
        trainer = EBTTrainer(model=model, args=args, train_dataset=token_dataset(16),
                             data_collator=default_data_collator)
        trainer.train(resume_from_checkpoint=resume_from)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer.replay_buffer

    uninterrupted, buffer = run()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = load_file(checkpoint / "replay_buffer_0.safetensors")
    assert saved["input_ids"].shape == (6, 32) and saved["logits"].shape == (6, 32, 257)
    assert len(buffer.records) == 6
    resumed, _ = run(resume_from=str(checkpoint))
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0, msg=name)

    (checkpoint / "replay_buffer_0.safetensors").unlink()  # resuming with an empty buffer takes another path
    without_buffer, _ = run(resume_from=str(checkpoint))
    assert any(not torch.equal(without_buffer[name], uninterrupted[name]) for name in uninterrupted)


def test_replay_buffer_state_round_trips_and_a_new_length_replaces_old_records():
    from modeling_ebt.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer(size=3)
    ids = torch.arange(8).view(4, 2)
    buffer.add(ids, ids + 1, torch.randn(4, 2, 5))
    assert [r[0].tolist() for r in buffer.records] == [[2, 3], [4, 5], [6, 7]]  # the newest 3 rows
    copy = ReplayBuffer(size=3)
    copy.load_state_dict(buffer.state_dict())
    for kept, restored in zip(buffer.records, copy.records):
        assert all(torch.equal(a, b) for a, b in zip(kept, restored))
    buffer.add(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long), torch.randn(1, 5, 5))
    assert len(buffer.records) == 1 and buffer.sample(2, "cpu")[0].shape == (1, 5)
    assert ReplayBuffer(size=3).state_dict() == {}


def test_descent_stats_report_each_batch_s_own_last_step_when_step_counts_vary():
    from types import SimpleNamespace

    from modeling_ebt.training import DescentStats

    stats = DescentStats()
    for losses in ([3.0, 1.0], [3.0, 4.0, 5.0]):  # System 2 training draws 2 or 3 steps per batch
        stats.add(SimpleNamespace(step_losses=torch.tensor(losses), energies=torch.zeros(len(losses), 1, 2)), 1.0)
    logs = DescentStats.summarize(stats.as_tensor(stats.num_steps, "cpu"))
    assert logs["last_step_loss"] == 3.0  # (1 + 5) / 2, not the 3rd step of the one batch that had it
    assert logs["loss_step_1"] == 3.0 and logs["loss_step_2"] == 2.5 and logs["loss_step_3"] == 5.0


def test_stock_trainer_trains_and_evaluates_an_ebt(tmp_path):
    set_seed(0)
    model = EBTForCausalLM(tiny_config())
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=2), train_dataset=token_dataset(8),
                      eval_dataset=token_dataset(8, seed=1), data_collator=default_data_collator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    metrics = trainer.evaluate()  # under no_grad: the model enables grad for its descent itself
    assert math.isfinite(metrics["eval_loss"])


def test_predictions_hold_only_the_logits(tmp_path):
    model = EBTForCausalLM(tiny_config())
    trainer = EBTTrainer(model=model, args=trainer_args(tmp_path), data_collator=default_data_collator)
    output = trainer.predict(token_dataset(6, length=16))
    assert isinstance(output.predictions, torch.Tensor) or hasattr(output.predictions, "shape")
    assert output.predictions.shape == (6, 16, model.config.vocab_size)
    assert math.isfinite(output.metrics["test_loss"]) and "test_perplexity" in output.metrics


def test_time_limit_stops_training_after_the_first_step(tmp_path):
    model = EBTForCausalLM(tiny_config())
    limit = TimeLimitCallback(seconds=0.0)
    trainer = EBTTrainer(model=model, args=trainer_args(tmp_path, max_steps=50), train_dataset=token_dataset(8),
                         data_collator=default_data_collator, callbacks=[limit])
    trainer.train()
    assert trainer.state.global_step == 1 and limit.stopped


def test_last_complete_checkpoint_skips_a_checkpoint_cut_short(tmp_path):
    for step, state in ((2, "{}"), (4, '{"global_step": 4}'), (6, '{"glob')):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-8").mkdir()  # killed before trainer_state.json was written
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "missing") is None


# --- bad input: clear errors, nothing in the output dir lost ----------------------------------------------------


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def trained_output_dir(tmp_path) -> Path:
    """An output dir that already holds a model and a checkpoint, as a finished run leaves it."""
    folder = tmp_path / "existing"
    (folder / "checkpoint-5").mkdir(parents=True)
    (folder / "checkpoint-5" / "trainer_state.json").write_text('{"global_step": 5}')
    (folder / "config.json").write_text('{"model_type": "ebt"}')
    (folder / "model.safetensors").write_bytes(b"weights that must survive")
    (folder / "training_summary.json").write_text('{"steps": 5}')
    return folder


def _corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("a small corpus of text for the tests. " * 200, encoding="utf-8")
    return path


def _bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text("\n".join(json.dumps({"content": f"row {i}"}) for i in range(50)) + "\n")
    big_tokenizer = tmp_path / "big-tokenizer"
    tokenizer = EBTTokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(big_tokenizer)
    corpus = str(_corpus(tmp_path))
    return {
        "missing corpus": (["--corpus", str(tmp_path / "nope.txt")], "corpus file not found"),
        "empty corpus": (["--corpus", str(empty)], "is empty"),
        "no text column": (["--corpus", str(no_text)], "has no text column 'text'; its columns are ['content']"),
        "block size": (["--corpus", corpus, "--block-size", "300"], "block_size=300 is larger than the model's "
                       "max_position_embeddings=257"),
        "tokenizer": (["--corpus", corpus, "--tokenizer", str(big_tokenizer)], "the tokenizer has 258 tokens"),
        "model arg": (["--corpus", corpus, "--model-arg", "hidden_size=30"], "EBTConfig.hidden_size=30 is invalid"),
        "no budget": (["--corpus", corpus, "--max-steps", "0"], "max_steps must be >= 1"),
    }


@pytest.mark.parametrize("case", ["missing corpus", "empty corpus", "no text column", "block size", "tokenizer",
                                  "model arg", "no budget"])
def test_train_rejects_bad_input_clearly_and_keeps_the_existing_output_dir(case, tmp_path, trained_output_dir,
                                                                          capsys):
    flags, message = _bad_inputs(tmp_path)[case]
    before = _snapshot(trained_output_dir)
    budget = [] if "--max-steps" in flags else ["--max-steps", "1"]
    status = main(["train", "--output-dir", str(trained_output_dir), "--overwrite", "--cache-dir",
                   str(tmp_path / "cache"), "--size", "4xs", *budget, *flags])
    assert status == 1
    assert message in capsys.readouterr().err
    assert _snapshot(trained_output_dir) == before


def test_train_refuses_an_output_dir_with_a_model_without_resume_or_overwrite(tmp_path, trained_output_dir,
                                                                              capsys):
    before = _snapshot(trained_output_dir)
    status = main(["train", "--output-dir", str(trained_output_dir), "--corpus", str(_corpus(tmp_path)),
                   "--max-steps", "1"])
    assert status == 1
    err = capsys.readouterr().err
    assert "already holds a trained model or checkpoints" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(trained_output_dir) == before


def test_resume_needs_a_checkpoint_of_an_ebt_train_run(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--output-dir", str(tmp_path / "empty"), "--resume"]) == 1
    assert "holds no complete checkpoint" in capsys.readouterr().err


# --- guard rails -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason=f"{TINY_SHAKESPEARE} is not on this machine (shared data "
                    "of the development machines and CI)")
def test_a_step_size_driven_to_its_floor_stops_training_with_a_clear_error(tmp_path):
    # the collapse of issue 15: alpha 5 with a 1500x learning rate at lr 3e-3 is driven below zero within ~20 steps
    from modeling_ebt.data import build_lm_datasets

    data = build_lm_datasets(EBTTokenizer(), TINY_SHAKESPEARE, block_size=64, cache_dir=tmp_path / "cache")
    set_seed(0)
    model = EBTForCausalLM(tiny_config(hidden_size=64, intermediate_size=64, mcmc_step_size=5.0,
                                       mcmc_step_size_lr_multiplier=1500.0))
    args = trainer_args(tmp_path, max_steps=50, per_device_train_batch_size=16, learning_rate=3e-3,
                        warmup_steps=2, logging_steps=10)
    trainer = EBTTrainer(model=model, args=args, train_dataset=data["train"], data_collator=default_data_collator)
    with pytest.raises(DescentCollapseError, match="mcmc_step_size_lr_multiplier=1500.*mcmc_step_size_learnable"):
        trainer.train()
    assert trainer.state.global_step < 50, trainer.state.global_step
    assert float(model.alpha.detach()) <= DescentGuard.ALPHA_FLOOR


def test_a_loss_pinned_at_the_uniform_guess_stops_training():
    guard, uniform = DescentGuard(), math.log(257)
    model = EBTForCausalLM(tiny_config())
    state = type("State", (), {"global_step": 0})()
    for step in range(0, DescentGuard.PINNED_STEPS, 10):
        state.global_step = step
        guard.on_log(None, state, None, logs={"loss": uniform + 0.002}, model=model)
    guard.on_log(None, state, None, logs={"loss": uniform - 0.5}, model=model)  # learning again: the count restarts
    for step in range(DescentGuard.PINNED_STEPS, 2 * DescentGuard.PINNED_STEPS, 10):
        state.global_step = step
        guard.on_log(None, state, None, logs={"loss": uniform}, model=model)
    state.global_step = 2 * DescentGuard.PINNED_STEPS
    with pytest.raises(DescentCollapseError, match=r"ln\(vocab_size\) = 5.549 .* since step 100"):
        guard.on_log(None, state, None, logs={"loss": uniform}, model=model)
