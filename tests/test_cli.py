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
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_ebt import EBTForCausalLM
from modeling_ebt.cli import build_parser, main

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
