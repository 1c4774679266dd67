"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with two CPU processes (gloo), against one process on the full batch.

This is what `configuration/accelerate/fsdp.yaml` asks accelerate to do on GPUs. On a machine without GPUs accelerate
1.15 never applies FSDP (`use_cpu` makes the run MULTI_CPU, i.e. DDP), so the test shards the model itself, as
accelerate's FSDP2 preparation does: each decoder layer is one unit, the root model another.

It does not work with torch 2.13, for three reasons found here (the test is an expected failure and turns into an
error the day it passes, so that the README and fsdp.yaml get updated):
1. `fully_shard` refuses 0-d parameters: "fully_shard doesn't support scalar parameters. Change alpha to a 1D tensor
   with numel equal to 1." (the step size α is a scalar, as in the reference checkpoints).
2. The observed stream reads the last layer's keys and values through `layer.self_attn.key_values(...)`, outside the
   layer's forward, so FSDP never gathers that layer's parameters: "aten.mul.Tensor got mixed torch.Tensor and
   DTensor" in its RMSNorm.
3. The descent takes `torch.autograd.grad` inside `forward`. FSDP2's backward hooks and its root's end-of-backward
   callback run for that inner gradient: the root's parameters are resharded while its forward is still running
   ("aten.mm.default got mixed torch.Tensor and DTensor" in the next descent step's candidate embedding). With
   `set_reshard_after_backward(False)` the run completes, but the outer backward's gradients never reach the
   sharded parameters (every `.grad` is None): the weights are wrong, silently.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS, BATCH, LENGTH, LEARNING_RATE = 3, 4, 16, 0.05


def build_model():
    from modeling_ebt import EBTForCausalLM
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    return EBTForCausalLM(tiny_config(denoising_initial_condition="zeros")).train()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (BATCH, LENGTH), generator=generator) for _ in range(STEPS)]


def train(model, rank=0, world=1) -> None:
    """Plain SGD on each process's share of every batch: equal shares, so the mean of the processes' mean losses is
    the full batch's mean loss and the gradients match one process on the full batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for batch in batches():
        mine = batch.chunk(world)[rank]
        model(mine, labels=mine).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def run_sharded(output: str) -> None:
    """One process of the two: shard as accelerate's FSDP2 preparation does, train, save the gathered weights."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = build_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    train(model, dist.get_rank(), dist.get_world_size())
    state = {name: value.full_tensor() if hasattr(value, "full_tensor") else value
             for name, value in model.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save(state, output)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="FSDP2 cannot train an EBT in torch 2.13: scalar α, the last layer read outside its forward, "
                          "and FSDP's hooks running for the descent's inner autograd.grad (see the module docstring)")
def test_fsdp2_two_processes_reach_the_weights_of_one_process(tmp_path):
    output = tmp_path / "sharded.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), __file__, str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]

    model = build_model()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    train(model)
    one, two = model.state_dict(), torch.load(output)
    assert max(float((one[name] - initial[name]).abs().max()) for name in one) > 1e-3
    for name in one:  # float32 sums in another order, as in the DDP test (tests/test_accelerate.py)
        torch.testing.assert_close(two[name].reshape(one[name].shape), one[name], rtol=1e-4, atol=1e-5, msg=name)


if __name__ == "__main__":
    run_sharded(sys.argv[1])
