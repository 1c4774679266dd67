"""`accelerate launch` with two CPU processes (gloo DDP) trains exactly like one process on the full batch.

The model takes `torch.autograd.grad` with respect to the candidates inside `forward` (the descent); DDP only hooks
the parameters' gradients, which that inner call never touches, so the outer backward reduces them as usual."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_ebt.cli import main

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIG = REPO / "configuration" / "accelerate" / "cpu_2proc.yaml"

# A tiny deterministic setup: no dropout exists in the model, the descent starts from zeros (no noise), the data
# order comes from the seed, and plain SGD without clipping keeps the update proportional to the gradient, so that a
# gradient scaled by the number of processes or by accumulation would show.
TRAIN_FLAGS = [
    "--model-arg", "hidden_size=32", "--model-arg", "num_hidden_layers=2", "--model-arg", "num_attention_heads=2",
    "--model-arg", "intermediate_size=32", "--model-arg", "denoising_initial_condition=zeros",
    "--model-arg", "mcmc_step_size=2.0", "--model-arg", "mcmc_step_size_lr_multiplier=1.0",
    "--training-arg", "optim=sgd", "--training-arg", "max_grad_norm=0", "--training-arg", "warmup_steps=0",
    "--training-arg", "lr_scheduler_type=constant", "--training-arg", "weight_decay=0",
    "--learning-rate", "0.05", "--block-size", "32", "--max-steps", "3", "--eval-samples", "0",
    "--logging-steps", "1", "--no-progress",
]  # fmt: skip



def write_corpus(path: Path) -> Path:
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(9)) for i in range(300)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
@pytest.mark.parametrize("two_process_flags", [[], ["--training-arg", "activation_checkpointing=true"]],
                         ids=["plain", "activation-checkpointing"])
def test_two_processes_with_half_batches_reach_the_weights_of_one_process_on_the_full_batch(tmp_path,
                                                                                           two_process_flags):
    # with activation checkpointing, the two processes also rebuild every descent step in the backward (DDP without
    # find_unused_parameters, as the Trainer sets it then): the same weights as one plain process
    corpus = write_corpus(tmp_path / "corpus.txt")
    cache = tmp_path / "cache"
    common = ["train", "--corpus", str(corpus), "--cache-dir", str(cache), *TRAIN_FLAGS]

    assert main([*common, "--output-dir", str(tmp_path / "one"), "--batch-size", "4"]) == 0

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    command = ["accelerate", "launch", "--config_file", str(ACCELERATE_CONFIG),
               "--main_process_port", str(_free_port()), "-m", "modeling_ebt.cli",
               *common, *two_process_flags, "--output-dir", str(tmp_path / "two"), "--batch-size", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]

    summary = json.loads((tmp_path / "two" / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_batch_size"] == 4 and summary["steps"] == 3
    assert summary["distributed_type"] == "MULTI_CPU"  # gloo DDP

    initial = _initial_weights()
    one = load_file(tmp_path / "one" / "model.safetensors")
    two = load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    moved = max(float((one[name] - initial[name]).abs().max()) for name in one)
    # float32: the two halves' mean gradients are averaged by all-reduce instead of one mean over the full batch;
    # the sums run in another order (~1e-7 relative per operation), which three SGD steps keep far below 1e-5. A
    # gradient off by the number of processes would differ by about a whole update (`moved` ≥ 1e-3).
    assert moved > 1e-3
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _initial_weights() -> dict[str, torch.Tensor]:
    """The weights both runs start from (seed 0, as `ebt train` builds the model)."""
    from transformers import set_seed

    from modeling_ebt import EBTForCausalLM
    from modeling_ebt.training import load_model_config

    config = load_model_config(None, "cpu-small", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=32, denoising_initial_condition="zeros", mcmc_step_size=2.0,
                               mcmc_step_size_lr_multiplier=1.0, pad_token_id=256, eos_token_id=256,
                               bos_token_id=256)
    set_seed(0)
    return {k: v.clone() for k, v in EBTForCausalLM(config).state_dict().items()}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
