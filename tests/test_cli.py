"""The `ebt` command: its subcommands, train → generate → eval on a tiny model, and exact resumption of a
training run killed with SIGKILL after a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, default_data_collator

from modeling_ebt import EBTConfig, EBTForCausalLM, EBTTokenizer
from modeling_ebt.cli import build_parser, main, train_options
from modeling_ebt.training import (
    RECIPES,
    EBTTrainer,
    TimeLimitCallback,
    TrainOptions,
    build_training_arguments,
    load_recipe,
    run_training,
)

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--model-arg", "hidden_size=32", "--model-arg", "num_hidden_layers=2", "--model-arg", "num_attention_heads=2",
    "--model-arg", "intermediate_size=32", "--model-arg", "max_position_embeddings=33",
    "--block-size", "32", "--batch-size", "4", "--no-progress",
]  # fmt: skip



@pytest.fixture
def corpus(tmp_path) -> Path:
    words = "now is the winter of our discontent made glorious summer by this sun of york".split()
    lines = [" ".join(words[(i * 5 + j * 2) % len(words)] for j in range(10)) for i in range(200)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_four_subcommands_parse_and_an_unknown_one_is_a_usage_error():
    parser = build_parser()
    for argv in (["train", "--output-dir", "x"], ["generate", "m", "--prompt", "p"], ["eval", "m"], ["push", "m", "r"]):
        args = parser.parse_args(argv)
        assert args.command == argv[0] and args.run.__name__ == f"_run_{argv[0]}"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["hello"])
    assert exit_info.value.code == 2


def test_train_then_generate_then_eval(tmp_path, corpus, capsys):
    out = tmp_path / "model"
    status = main(["train", "--output-dir", str(out), "--corpus", str(corpus), "--cache-dir", str(tmp_path / "c"),
                   "--max-steps", "4", "--eval-samples", "4", *TINY])
    assert status == 0
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "training_summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens_seen"] == 4 * 4 * 32 and summary["corpus"] == str(corpus)
    assert summary["model_size"] == "4xs" and summary["recipe"] == "cpu-small"
    assert {"eval_loss", "eval_last_step_loss", "eval_perplexity"} <= set(summary["eval"])
    assert isinstance(summary["alpha"], float) and len(summary["final_train_step_losses"]) == 2

    model = AutoModelForCausalLM.from_pretrained(out)  # the Auto classes find the EBT
    assert isinstance(model, EBTForCausalLM)
    assert AutoTokenizer.from_pretrained(out).decode([104, 105]) == "hi"
    capsys.readouterr()

    assert main(["generate", str(out), "--prompt", "now is", "--max-new-tokens", "6", "--candidates", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("now is") and len(printed.encode()) >= len("now is")

    assert main(["eval", str(out), "--steps", "1,3", "--candidates", "1,2", "--eval-samples", "4",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    report = json.loads((out / "eval_results.json").read_text())
    assert set(report["by_steps"]) == {"1", "3"} and set(report["by_candidates"]) == {"1", "2"}
    assert report["corpus"] == str(corpus) and report["block_size"] == 32
    assert all(v["loss"] > 0 for v in report["by_steps"].values())
    assert (out / "eval_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_follows_the_run_and_overwrite_drops_the_old_evaluation(tmp_path, corpus, capsys):
    out = tmp_path / "model"
    train = ["train", "--output-dir", str(out), "--corpus", str(corpus), "--cache-dir", str(tmp_path / "c"),
             "--max-steps", "2", "--eval-samples", "0", "--validation-fraction", "0.3",
             "--model-arg", "randomize_mcmc_num_steps=1", "--training-arg", "hub_token=hf_NotARealSecret", *TINY]
    assert main(train) == 0
    assert "hf_NotARealSecret" not in (out / "ebt_train_options.json").read_text()
    assert json.loads((out / "ebt_train_options.json").read_text())["training_args"]["hub_token"] == "<redacted>"

    assert main(["eval", str(out), "--eval-samples", "0"]) == 1
    assert "--eval-samples and --batch-size must be >= 1, got 0" in capsys.readouterr().err
    assert main(["eval", str(out), "--steps", "1,3", "--candidates", "1", "--eval-samples", "4",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    report = json.loads((out / "eval_results.json").read_text())
    assert report["validation_fraction"] == 0.3  # the run's split: no training text is scored
    # time_embed with 2 landscapes descends the last one once more in evaluation: 3 steps, as the candidates row
    assert report["trained_steps"] == 3 == out_steps(out)
    assert report["by_candidates"]["1"]["loss"] == report["by_steps"]["3"]["loss"]

    assert main([*train, "--overwrite"]) == 0  # a new model: the old evaluation must not describe it
    assert not (out / "eval_results.json").exists() and not (out / "eval_plot.png").exists()


def out_steps(model_dir: Path) -> int:
    """The descent steps the saved model takes in evaluation, counted on a forward pass."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return len(model(torch.zeros(1, 4, dtype=torch.long)).energies)


def test_generate_reports_a_missing_model_clearly(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 1
    assert "holds no model (no config.json)" in capsys.readouterr().err


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
from transformers import TrainerCallback
from modeling_ebt.cli import build_parser, train_options
from modeling_ebt.training import run_training

class KillAfterCheckpoint(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # called once the checkpoint is complete
        if state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)

run_training(train_options(build_parser().parse_args(sys.argv[1:])), callbacks=[KillAfterCheckpoint()])
"""


def test_a_run_killed_after_a_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, corpus):
    # The default recipe starts the descent from random noise: resuming must restore the RNG state too.
    flags = ["train", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "c"), "--max-steps", "8",
             "--save-steps", "4", "--eval-samples", "0", "--logging-steps", "2", *TINY]
    killed = tmp_path / "killed"
    env = {**os.environ, "KILL_AT_STEP": "4", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, *flags, "--output-dir", str(killed)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr[-3000:]  # SIGKILL
    assert (killed / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (killed / "model.safetensors").exists() and not (killed / "checkpoint-8").exists()

    assert main(["train", "--output-dir", str(killed), "--resume", "--no-progress"]) == 0
    assert main([*flags, "--output-dir", str(tmp_path / "straight")]) == 0

    resumed, straight = load_file(killed / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    summary = json.loads((killed / "training_summary.json").read_text())
    assert summary["steps"] == 8 and summary["tokens_seen"] == 8 * 4 * 32


def test_the_options_file_records_local_paths_absolutely_for_resuming_from_anywhere(tmp_path, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "size.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2,
                                                    "num_attention_heads": 2, "intermediate_size": 32}))
    assert main(["train", "--output-dir", "out", "--corpus", corpus.name, "--cache-dir", "c", "--size", "size.json",
                 "--max-steps", "1", "--eval-samples", "0", *TINY]) == 0
    options = json.loads((tmp_path / "out" / "ebt_train_options.json").read_text())
    assert options["corpus"] == str(corpus) and options["cache_dir"] == str(tmp_path / "c")
    assert options["size"] == str(tmp_path / "size.json") and options["recipe"] == "cpu-small"  # a name stays


def test_train_with_a_time_budget_plans_its_steps_and_stops_in_time(tmp_path, corpus):
    out = tmp_path / "timed"
    assert main(["train", "--output-dir", str(out), "--corpus", str(corpus), "--cache-dir", str(tmp_path / "c"),
                 "--max-minutes", "0.05", "--eval-samples", "0", *TINY]) == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["planned_steps"] >= 1 and 1 <= summary["steps"] <= summary["planned_steps"]
    assert summary["train_seconds_this_session"] < 3 + 10  # the 3 s budget, plus start-up and one step's overshoot
    options = json.loads((out / "ebt_train_options.json").read_text())
    assert options["planned_steps"] == summary["planned_steps"]  # what --resume will continue to


# --- typed flags: TrainOptions and TrainingArguments through HfArgumentParser -----------------------------------


def _training_arguments(argv: list[str], recipe=None):
    """The TrainingArguments that `ebt train <argv>` would train with (nothing is run or written)."""
    options = train_options(build_parser().parse_args(["train", "--output-dir", "unused", *argv]))
    return options, build_training_arguments(options, load_recipe(recipe or options.recipe), max_steps=5)


def test_typed_training_flags_override_the_recipe_and_the_rest_keeps_the_recipes_values(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"training": {"learning_rate": 0.01, "seed": 7, "warmup_steps": 3,
                                               "weight_decay": 0.2}}))
    options, args = _training_arguments(["--recipe", str(recipe), "--learning-rate", "0.02", "--adam_beta2", "0.98",
                                         "--training-arg", "max_grad_norm=0.5"])
    assert options.training_args == {"learning_rate": 0.02, "adam_beta2": 0.98, "max_grad_norm": 0.5}  # given only
    assert (args.learning_rate, args.adam_beta2, args.max_grad_norm) == (0.02, 0.98, 0.5)  # flags beat the recipe
    assert (args.seed, args.warmup_steps, args.weight_decay) == (7, 3, 0.2)  # the recipe beats ebt train's defaults
    assert (args.logging_steps, args.save_total_limit, args.report_to) == (10, 2, [])  # ebt train's defaults
    # a flag given is a flag given, even at TrainingArguments' own default (42): it beats the recipe's 7
    assert _training_arguments(["--recipe", str(recipe), "--seed", "42"])[1].seed == 42
    # the shipped recipe's values apply when no flag overrides them
    _, args = _training_arguments([])
    assert (args.learning_rate, args.warmup_steps, args.lr_scheduler_type.value) == (
        RECIPES["cpu-small"]["training"]["learning_rate"], 0.05, "cosine_with_min_lr")
    assert (args.per_device_train_batch_size, args.eval_strategy.value, args.disable_tqdm) == (16, "no", False)
    _, args = _training_arguments(["--eval-steps", "2", "--batch-size", "3", "--no-progress"])
    assert (args.eval_strategy.value, args.eval_steps, args.per_device_eval_batch_size, args.disable_tqdm) == (
        "steps", 2, 3, True)


def test_a_typed_training_flag_reaches_the_trainer_and_the_options_file(tmp_path, corpus):
    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--corpus", str(corpus), "--cache-dir", str(tmp_path / "c"),
                 "--max-steps", "1", "--eval-samples", "0", "--weight_decay", "0.3", "--seed", "5", *TINY]) == 0
    saved = torch.load(out / "training_args.bin", weights_only=False)  # what the Trainer trained with
    assert (saved.weight_decay, saved.seed, saved.learning_rate) == (0.3, 5, 0.003)
    options = json.loads((out / "ebt_train_options.json").read_text())
    assert options["training_args"] == {"weight_decay": 0.3, "seed": 5}
    assert json.loads((out / "training_summary.json").read_text())["seed"] == 5


@pytest.mark.parametrize("flags, message", [
    (["--training-arg", "foo=1"], "--training-arg: ['foo'] are not TrainingArguments fields"),
    (["--training-arg", "learnin_rate=1"], "did you mean learning_rate"),
    (["--training-arg", "learning_rate=abc"], "learning_rate=abc: argument --learning_rate/--learning-rate: invalid "
                                              "float value: 'abc'"),
    (["--training-arg", "warmup_ratio=0.05"], "TrainingArguments.warmup_ratio was removed in transformers 5; use "
                                              "warmup_steps (a value below 1 is a fraction of the run"),
    (["--warmup-ratio", "0.05"], "--warmup-ratio: TrainingArguments.warmup_ratio was removed in transformers 5"),
    (["--training-arg", "max_steps=3"], "max_steps is set by ebt train; use --max-steps"),
    (["--learning_rate", "abc"], "argument --learning_rate/--learning-rate: invalid float value: 'abc'"),
])
def test_bad_training_arguments_are_clear_errors_before_anything_is_written(tmp_path, corpus, capsys, flags,
                                                                            message):
    out = tmp_path / "run"
    try:
        status = main(["train", "--output-dir", str(out), "--corpus", str(corpus), "--max-steps", "1", *flags])
    except SystemExit as exit_info:  # argparse's own usage errors
        status = exit_info.code
    assert status in (1, 2)
    assert message in capsys.readouterr().err
    assert not out.exists()  # so that the corrected command needs no --overwrite


def test_removed_training_arguments_in_a_recipe_or_in_python_are_clear_errors(tmp_path):
    recipe = tmp_path / "old.json"
    recipe.write_text(json.dumps({"training": {"evaluation_strategy": "steps"}}))
    with pytest.raises(ValueError, match=r"old.json, training: TrainingArguments.evaluation_strategy was removed .* "
                                         r"use eval_strategy"):
        load_recipe(recipe)
    options = TrainOptions(output_dir=str(tmp_path / "run"), max_steps=1, training_args={"warmup_ratio": 0.1})
    with pytest.raises(ValueError, match="training_args: TrainingArguments.warmup_ratio was removed"):
        run_training(options)
    assert not (tmp_path / "run").exists()


def test_the_step_count_flag_of_generate_and_eval_is_mcmc_num_steps_with_steps_kept():
    parser = build_parser()
    for flag in ("--mcmc-num-steps", "--mcmc_num_steps", "--steps"):
        assert parser.parse_args(["generate", "m", "--prompt", "p", flag, "3"]).mcmc_num_steps == 3
        assert parser.parse_args(["eval", "m", flag, "1,3"]).steps == [1, 3]
    assert parser.parse_args(["eval", "m"]).steps == [1, 2, 4, 8]


def test_eval_takes_a_validation_fraction_of_zero_as_given(tmp_path, corpus, capsys):
    model_dir = tmp_path / "model"
    EBTForCausalLM(EBTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=33)).save_pretrained(model_dir)
    EBTTokenizer().save_pretrained(model_dir)
    status = main(["eval", str(model_dir), "--corpus", str(corpus), "--cache-dir", str(tmp_path / "c"),
                   "--validation-fraction", "0"])
    assert status == 1  # not the 0.1 of a flag not given
    assert "validation_fraction must be strictly between 0 and 1, not 0.0" in capsys.readouterr().err


# --- the time budget: re-planned as training goes ---------------------------------------------------------------


class FakeClock(TrainerCallback):
    """A clock that each optimizer step advances by `seconds(step)`, the step's simulated duration."""

    def __init__(self, seconds):
        self.now, self.seconds = 0.0, seconds

    def __call__(self) -> float:
        return self.now

    def on_step_begin(self, args, state, control, **kwargs):
        self.now += self.seconds(state.global_step + 1)


def _train_on_the_clock(tmp_path, step_seconds, budget, planned_steps, replan=True):
    from tests.test_training import tiny_config, token_dataset, trainer_args

    clock = FakeClock(step_seconds)
    limit = TimeLimitCallback(budget, planned_steps=planned_steps if replan else None, replan_every=5, clock=clock)
    max_steps = limit.max_steps_bound if replan else planned_steps
    args = trainer_args(tmp_path, max_steps=max_steps, lr_scheduler_type="linear", learning_rate=1e-3)
    trainer = EBTTrainer(model=EBTForCausalLM(tiny_config()), args=args, train_dataset=token_dataset(8, length=8),
                         data_collator=default_data_collator, callbacks=[clock, limit])
    trainer.train()
    return trainer, clock


def test_a_time_budget_on_a_machine_that_slows_down_ends_on_the_clock_with_the_schedule_done(tmp_path):
    # the probe said 1 s per step (60 steps in 60 s); from step 11 on, each step takes 3 s
    def step_seconds(step):
        return 1.0 if step <= 10 else 3.0

    trainer, clock = _train_on_the_clock(tmp_path, step_seconds, budget=60, planned_steps=60)
    steps = trainer.state.global_step
    assert steps == 10 + 50 // 3  # what fits: 10 steps of 1 s, then 16 of 3 s
    assert 57 <= clock.now <= 60
    assert trainer.state.max_steps == steps  # the schedule's horizon moved with the plan ...
    assert trainer.lr_scheduler.get_last_lr()[0] <= 0.05 * 1e-3  # ... so the linear decay is (nearly) done
    unplanned, _ = _train_on_the_clock(tmp_path / "unplanned", step_seconds, budget=60, planned_steps=60,
                                       replan=False)
    assert unplanned.state.global_step == steps + 1  # stopped by the clock only, one step over,
    assert unplanned.lr_scheduler.get_last_lr()[0] > 0.5 * 1e-3  # in the middle of its schedule


def test_a_time_budget_on_a_machine_faster_than_the_probe_trains_for_the_whole_budget(tmp_path):
    trainer, clock = _train_on_the_clock(tmp_path, lambda step: 1.0, budget=60, planned_steps=20)
    assert trainer.state.global_step == trainer.state.max_steps == 60  # three times the first plan
    assert clock.now == 60
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0


def test_resume_takes_the_checkpoints_horizon_and_reads_options_files_of_earlier_versions(tmp_path):
    from modeling_ebt.training import _resolve_options

    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4, "max_steps": 37}))
    (tmp_path / "ebt_train_options.json").write_text(json.dumps({
        "output_dir": "elsewhere", "max_minutes": 2.0, "planned_steps": 50, "learning_rate": 0.01, "seed": 3,
        "eval_steps": None, "training_args": {"weight_decay": 0.2, "hub_token": "<redacted>"}}))
    resumed = _resolve_options(TrainOptions(output_dir=str(tmp_path), resume=True), tmp_path / "checkpoint-4")
    assert resumed.planned_steps == 37  # where the re-planned run was heading when it saved that checkpoint
    assert resumed.training_args == {"weight_decay": 0.2, "learning_rate": 0.01, "seed": 3}
    assert (resumed.output_dir, resumed.max_minutes, resumed.resume) == (str(tmp_path), 2.0, True)
