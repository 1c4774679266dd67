"""What `ebt train` promises about its run folder, tested by breaking it: exact resume (also after SIGKILL at random
moments and at named points of checkpoint writing, rotation and the final save), no complete checkpoint lost, one
run per folder, no secret on disk; plus configuration validation and errors that name the file or field."""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_ebt import EBTConfig, EBTForCausalLM
from modeling_ebt.checkpointing import (
    RunLock,
    clear_leftovers,
    complete_checkpoints,
    is_complete_checkpoint,
    last_complete_checkpoint,
    rotate_checkpoints,
)
from modeling_ebt.cli import main
from modeling_ebt.convert_reference_checkpoint import infer_config

from .test_accelerate import write_corpus
from .test_cli import TINY as CLI_TINY

REPO = Path(__file__).resolve().parents[1]
TINY = [*CLI_TINY, "--batch-size", "2", "--eval-samples", "0"]  # the later --batch-size wins
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.txt")


def train_flags(tmp_path: Path, corpus: Path, max_steps: int = 6, save_steps: int = 2) -> list[str]:
    return ["train", "--corpus", str(corpus), "--cache-dir", str(tmp_path / "cache"), "--max-steps", str(max_steps),
            "--save-steps", str(save_steps), "--logging-steps", "1", *TINY]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def steps_of(folder: Path) -> int:
    return json.loads((folder / "training_summary.json").read_text())["steps"]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- exact resume -----------------------------------------------------------------------------------------------


def test_resume_after_the_last_checkpoint_trains_no_extra_step_and_a_finished_run_trains_nothing(tmp_path, corpus,
                                                                                                capsys):
    reference, copy = tmp_path / "ref", tmp_path / "copy"
    assert main([*train_flags(tmp_path, corpus), "--output-dir", str(reference)]) == 0
    shutil.copytree(reference, copy)
    (copy / "model.safetensors").unlink()  # as a kill between checkpoint-6 and the final save leaves it
    (copy / "training_summary.json").unlink()
    capsys.readouterr()
    assert main(["train", "--output-dir", str(copy), "--resume", "--no-progress"]) == 0
    assert "checkpoint-6 already holds all 6 steps" in capsys.readouterr().err
    assert steps_of(copy) == 6 and same_weights(weights(copy), weights(reference))

    before = snapshot(copy)
    assert main(["train", "--output-dir", str(copy), "--resume", "--no-progress"]) == 0
    assert "holds a finished run (6 steps, model saved): nothing to resume" in capsys.readouterr().err
    assert snapshot(copy) == before


# --- complete checkpoints and rotation --------------------------------------------------------------------------


def fake_checkpoint(folder: Path, step: int, state: str | None = None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "trainer_state.json").write_text(state if state is not None else json.dumps({"global_step": step}))
    return path


def test_one_definition_of_complete_ignores_cut_short_mislabelled_and_staged_folders(tmp_path):
    for step in (2, 4):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 6, state='{"glob')  # cut short while writing its last file
    fake_checkpoint(tmp_path, 8, state='{"global_step": 2}')  # not the state of step 8
    (tmp_path / "checkpoint-10").mkdir()  # nothing written yet
    shutil.copytree(tmp_path / "checkpoint-4", tmp_path / "tmp-checkpoint-12")  # staged, never renamed
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert not is_complete_checkpoint(tmp_path / "tmp-checkpoint-12")

    clear_leftovers(tmp_path)  # what a run does first: leftovers go, complete checkpoints stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_rotation_orders_by_step_and_only_deletes_complete_checkpoints_older_than_a_complete_one(tmp_path):
    for step in (20, 40, 60):
        fake_checkpoint(tmp_path, step)
    os.utime(tmp_path / "checkpoint-20", (time.time() + 100,) * 2)  # the newest mtime must not protect it
    (tmp_path / "checkpoint-80").mkdir()  # incomplete: never counted, never a reason to delete
    rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-40", "checkpoint-60", "checkpoint-80"]
    rotate_checkpoints(tmp_path, keep=1, protected=str(tmp_path / "checkpoint-40"))  # the best model's stays
    assert sorted(p.name for p in complete_checkpoints(tmp_path)) == ["checkpoint-40", "checkpoint-60"]


# --- one run per folder -----------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_is_refused_and_changes_nothing(tmp_path, corpus, capsys):
    folder = tmp_path / "dup"
    assert main([*train_flags(tmp_path, corpus, max_steps=2), "--output-dir", str(folder)]) == 0
    before = snapshot(folder)
    with RunLock(folder):
        assert main([*train_flags(tmp_path, corpus, max_steps=2), "--output-dir", str(folder), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"output dir {folder} is in use by another `ebt train` run" in err and "--output-dir" in err
    assert snapshot(folder) == before


# loads checkpointing.py alone (no torch import): a process that takes the run lock and waits to be killed
HOLD_LOCK = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("checkpointing", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.RunLock(sys.argv[2]).__enter__()
print("locked", flush=True)
time.sleep(600)
"""


def test_a_run_killed_with_sigkill_leaves_no_stuck_lock(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(REPO / "modeling_ebt" / "checkpointing.py"),
                               str(folder)], env=ENV, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match="is in use by another `ebt train` run"):
            RunLock(folder).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with RunLock(folder):  # the kernel dropped the dead process's lock
        assert folder.is_dir()
    assert list(folder.iterdir()) == []  # the lock writes nothing


def test_two_runs_started_together_into_one_folder_one_is_refused_the_other_untouched(tmp_path, corpus):
    assert main([*train_flags(tmp_path, corpus, max_steps=1), "--output-dir", str(tmp_path / "warm")]) == 0
    folder = tmp_path / "dup"
    env = {**ENV, "EBT_FAULT_INJECTION": "locked=sleep:6"}  # the holder keeps the lock long enough to collide
    runs = [subprocess.Popen([sys.executable, "-m", "modeling_ebt.cli", *train_flags(tmp_path, corpus, max_steps=2),
                              "--output-dir", str(folder), "--seed", str(seed)], env=env, stderr=subprocess.PIPE,
                             text=True) for seed in (1, 2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], [err[-2000:] for _, err in results]
    winner = 1 + [code for code, _ in results].index(0)
    assert "is in use by another `ebt train` run" in results[2 - winner][1]
    assert json.loads((folder / "training_summary.json").read_text())["seed"] == winner
    assert json.loads((folder / "ebt_train_options.json").read_text())["training_args"]["seed"] == winner
    assert steps_of(folder) == 2 and is_complete_checkpoint(folder / "checkpoint-2")


# --- no secret on disk ------------------------------------------------------------------------------------------


def test_no_file_a_run_writes_holds_the_hub_token(tmp_path, corpus):
    token = "hf_FakeTokenForTheReliabilityTest1234"
    folder = tmp_path / "run"
    assert main([*train_flags(tmp_path, corpus, max_steps=4), "--output-dir", str(folder),
                 "--training-arg", f"hub_token={token}"]) == 0
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written) and len(written) > 20
    assert [p for p in written if token.encode() in p.read_bytes()] == []
    args = torch.load(folder / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.max_steps == 4  # the arguments themselves are kept


def test_pushing_during_training_with_a_hub_token_argument_is_refused(tmp_path):
    from transformers import TrainingArguments

    from modeling_ebt.training import EBTTrainer

    args = TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="alice/x", report_to="none",
                             hub_token="hf_FakeTokenThatMustNotBeUploaded5678", use_cpu=True)
    with pytest.raises(ValueError, match="upload the token inside training_args.bin: give the token through the "
                                         "HF_TOKEN"):
        EBTTrainer(model=EBTForCausalLM(EBTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)),
                   args=args)


# --- configuration validation -----------------------------------------------------------------------------------

BAD_FIELDS = [
    ("contrastive_loss_coeff", math.inf, "a number >= 0 (and finite)"),
    ("rms_norm_eps", math.inf, "a number > 0 (and finite)"),
    ("mcmc_step_size", math.nan, "a number > 0 (and finite)"), ("mcmc_num_steps", 0, "an integer >= 1"),
    ("sliding_window", 0, "None or an integer in [1, max_position_embeddings] (None: full attention)"),
    ("sliding_window", -1, "None or an integer in [1, max_position_embeddings] (None: full attention)"),
    ("pad_token_id", -5, "None or a token id (an integer >= 0)"),
    ("bos_token_id", "x", "None or a token id (an integer >= 0)"),
    ("eos_token_id", [], "None, a token id or a non-empty list of token ids"),
    ("num_hidden_layers", True, "an integer >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "value", "expected"), BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_every_way_of_making_a_config_checks_each_field(field, value, expected, tmp_path):
    message = f"EBTConfig.{field}={value!r} is invalid: expected {expected}"
    with pytest.raises(ValueError, match=re.escape(message)):
        EBTConfig(**{field: value})
    config = EBTConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1)
    with pytest.raises(ValueError, match="is invalid: expected"):
        setattr(config, field, value)  # after construction
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is invalid: expected"):
        EBTConfig.from_pretrained(tmp_path, **{field: value})  # a load-time override


@pytest.mark.parametrize("value", [10**6, 257])
def test_token_ids_must_lie_in_the_vocabulary_however_they_arrive(value, tmp_path):
    with pytest.raises(ValueError, match=f"EBTConfig.eos_token_id={value} is invalid: expected None or token ids in "
                                         r"\[0, vocab_size=257\)"):
        EBTConfig(eos_token_id=value)
    config = EBTConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"EBTConfig.pad_token_id={value} is invalid"):
        EBTConfig.from_pretrained(tmp_path, pad_token_id=value)
    config.pad_token_id = value  # relations between fields are checked as a whole, at the latest before saving
    with pytest.raises(ValueError, match=f"EBTConfig.pad_token_id={value} is invalid"):
        config.save_pretrained(tmp_path / "again")


def test_a_model_loaded_with_an_invalid_override_fails_at_load_time(tmp_path):
    EBTForCausalLM(EBTConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                             max_position_embeddings=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="EBTConfig.sliding_window=-1 is invalid"):
        EBTForCausalLM.from_pretrained(tmp_path, sliding_window=-1)
    with pytest.raises(ValueError, match=r"EBTConfig.sliding_window=17 is invalid: expected None or an integer in "
                                         r"\[1, max_position_embeddings=16\]"):
        EBTForCausalLM.from_pretrained(tmp_path, sliding_window=17)
    assert EBTForCausalLM.from_pretrained(tmp_path, sliding_window=8).config.sliding_window == 8


# --- errors that name the file and the fix ----------------------------------------------------------------------


@pytest.fixture
def saved_run(tmp_path, corpus) -> Path:
    folder = tmp_path / "model"
    assert main([*train_flags(tmp_path, corpus, max_steps=2), "--output-dir", str(folder)]) == 0
    return folder


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_weights_file_is_named_by_generate_and_from_pretrained(damage, saved_run, capsys):
    path = saved_run / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])
    with pytest.raises(OSError, match=f"{path} is damaged .*save the model again"):
        EBTForCausalLM.from_pretrained(saved_run)
    capsys.readouterr()
    assert main(["generate", str(saved_run), "--prompt", "now", "--max-new-tokens", "2"]) == 1
    assert f"ebt generate: error: {path} is damaged" in capsys.readouterr().err


def test_a_full_disk_while_writing_a_checkpoint_gives_a_clear_error_and_keeps_no_part_of_it(tmp_path, corpus,
                                                                                            monkeypatch, capsys):
    import transformers.trainer

    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        calls.append(str(path))
        if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(transformers.trainer.torch, "save", save_until_the_disk_is_full)
    folder = tmp_path / "full"
    assert main([*train_flags(tmp_path, corpus, max_steps=6), "--output-dir", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint-4" in err and "No space left on device" in err
    assert "the last complete checkpoint is checkpoint-2: free space and continue with --resume" in err
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["checkpoint-2"]  # no tmp-*, no checkpoint-4
    assert is_complete_checkpoint(folder / "checkpoint-2") and any("checkpoint-4" in c for c in calls)


def test_a_state_dict_without_layers_is_refused_clearly():
    state = {"embeddings.weight": torch.zeros(257, 32), "transformer.final_layer.weight": torch.zeros(1, 32)}
    with pytest.raises(ValueError, match="not a reference EBT state dict: missing "
                                         "'transformer.layers.0.attention.wk.weight'"):
        infer_config(state, {}, num_attention_heads=2, context_length=32)


def test_eval_refuses_a_validation_fraction_of_zero_instead_of_using_the_default(saved_run, capsys):
    assert main(["eval", str(saved_run), "--validation-fraction", "0", "--eval-samples", "2"]) == 1
    assert "validation_fraction must be strictly between 0 and 1, not 0" in capsys.readouterr().err


def test_fp16_on_the_cpu_is_refused_rather_than_silently_float32(tmp_path, corpus, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU runs fp16")
    folder = tmp_path / "fp16"
    assert main([*train_flags(tmp_path, corpus, max_steps=1), "--output-dir", str(folder),
                 "--training-arg", "fp16=true"]) == 1
    assert "fp16=True needs a GPU" in capsys.readouterr().err and not folder.exists()


def test_a_model_of_another_vocabulary_saved_without_a_tokenizer_is_refused_before_generating(tmp_path, capsys):
    folder = tmp_path / "vocab300"
    EBTForCausalLM(EBTConfig(vocab_size=300, hidden_size=32, num_attention_heads=2, num_hidden_layers=1,
                             max_position_embeddings=16)).save_pretrained(folder)
    assert main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"]) == 1
    captured = capsys.readouterr()
    assert "has vocab_size=300 but no tokenizer is saved with it, and the default one has 257 ids" in captured.err
    assert captured.out == ""  # nothing generated


# --- fault injection: SIGKILL at random moments and at named points ---------------------------------------------

# named points (modeling_ebt.checkpointing.fault_point) in the order a run reaches them
FAULT_POINTS = ["locked", "weights-written", "checkpoint-staged", "checkpoint-committed", "removing",
                "final-file-committed", "final-committed"]


class FaultInjection:
    """Kills `ebt train` subprocesses in one folder (at a named point or after a random delay), checks the folder
    after each kill, then resumes in-process and compares with the uninterrupted run."""

    def __init__(self, tmp_path: Path, corpus: Path, max_steps: int, save_steps: int):
        self.tmp_path, self.flags = tmp_path, train_flags(tmp_path, corpus, max_steps, save_steps)
        self.max_steps = max_steps
        reference = tmp_path / "reference"
        started = time.monotonic()
        assert main([*self.flags, "--output-dir", str(reference)]) == 0  # also fills the tokenized cache
        self.run_seconds = time.monotonic() - started
        self.reference = weights(reference)
        self.kills = self.resumes = self.identical = 0
        self.kills_by_kind: collections.Counter[str] = collections.Counter()

    def run(self, folder: Path, resume: bool, fault: str | None = None, delay: float | None = None) -> bool:
        """One subprocess; True if it was killed."""
        args = self.resume_args(folder) if resume else self.fresh_args(folder)
        env = {**ENV, "EBT_FAULT_INJECTION": fault} if fault else ENV
        process = subprocess.Popen([sys.executable, "-m", "modeling_ebt.cli", *args], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if delay is not None:
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
        _, err = process.communicate(timeout=600)
        assert process.returncode in (0, -signal.SIGKILL), err[-3000:]
        killed = process.returncode == -signal.SIGKILL
        self.kills += killed
        if killed:
            self.kills_by_kind[fault.split("=")[0] if fault else "random delay"] += 1
        return killed

    def fresh_args(self, folder: Path) -> list[str]:
        return [*self.flags, "--output-dir", str(folder), "--overwrite"]

    @staticmethod
    def resume_args(folder: Path) -> list[str]:
        return ["train", "--output-dir", str(folder), "--resume", "--no-progress"]

    @staticmethod
    def resumable(folder: Path) -> bool:
        """--resume needs the run's options and a complete checkpoint; killed earlier, the run starts again."""
        return (folder / "ebt_train_options.json").is_file() and last_complete_checkpoint(folder) is not None

    def check_folder(self, folder: Path, last_before: int) -> int:
        """No folder under a checkpoint name is incomplete, and no complete checkpoint newer than one deleted is
        lost: the newest complete step never goes back."""
        named = [p for p in folder.glob("checkpoint-*")]
        assert all(is_complete_checkpoint(p) for p in named), [p.name for p in named]
        last = last_complete_checkpoint(folder)
        step = int(last.name.split("-")[1]) if last else 0
        assert step >= last_before, (step, last_before)
        return step

    def resume_and_compare(self, folder: Path) -> None:
        finished = (folder / "training_summary.json").is_file()
        assert main(self.resume_args(folder) if finished or self.resumable(folder) else self.fresh_args(folder)) == 0
        self.resumes += 1
        assert steps_of(folder) == self.max_steps
        assert same_weights(weights(folder), self.reference)
        self.identical += 1

    def kill_then_resume(self, folder: Path, kills: list[tuple[str | None, float | None]]) -> None:
        last = 0
        for index, (fault, delay) in enumerate(kills):
            self.run(folder, resume=index > 0 and self.resumable(folder), fault=fault, delay=delay)
            last = self.check_folder(folder, last)
        self.resume_and_compare(folder)


def test_sigkill_during_checkpoint_writes_rotation_and_the_final_save_then_resume_is_exact(tmp_path, corpus):
    injection = FaultInjection(tmp_path, corpus, max_steps=6, save_steps=2)
    # mid-checkpoint (files written, not yet renamed), mid-rotation (checkpoint-2 renamed away, being deleted),
    # mid-final-save (some model files renamed into place, no summary yet)
    for name, kills in (("staged", [("checkpoint-staged=kill@2", None)]), ("rotation", [("removing=kill@1", None)]),
                        ("final", [("final-file-committed=kill@2", None)])):
        injection.kill_then_resume(tmp_path / name, kills)
    assert (injection.kills, injection.resumes, injection.identical) == (3, 3, 3)


@pytest.mark.slow
def test_sigkill_at_fifty_random_moments_then_resume_is_exact_every_time(tmp_path, corpus):
    rng = random.Random(int(os.environ.get("EBT_FAULT_SEED", "0")))
    injection = FaultInjection(tmp_path, corpus, max_steps=8, save_steps=2)
    timed = (0.3 * injection.run_seconds + 3.0, injection.run_seconds + 6.0)  # the subprocess also imports torch
    iteration = 0
    while injection.kills < 50:
        iteration += 1
        kills = []
        for _ in range(rng.choice((1, 1, 2))):  # sometimes the resumed run is killed too
            if rng.random() < 0.5:
                point = rng.choice(FAULT_POINTS)
                kills.append((f"{point}=kill@{rng.randint(1, 3)}", None))
            else:
                kills.append((None, rng.uniform(*timed)))
        injection.kill_then_resume(tmp_path / f"run-{iteration}", kills)
        shutil.rmtree(tmp_path / f"run-{iteration}")
    print(f"\nfault injection: {injection.kills} kills over {iteration} runs, {injection.resumes} resumes, "
          f"{injection.identical} bit-identical to the uninterrupted run; kills by kind: "
          f"{dict(sorted(injection.kills_by_kind.items()))}")
    assert injection.identical == injection.resumes == iteration

