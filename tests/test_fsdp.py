"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with two CPU processes (gloo), against one process on the full batch.

The model is sharded as accelerate's FSDP2 preparation shards it (each decoder layer one unit, the root model
another). Three things had to change for the descent's double backward (see `keep_fsdp_weights_gathered`): α is a
1-element parameter (FSDP refuses 0-d ones), the last layer's keys and values are read through that layer's
`forward` (so FSDP gathers its weights), and every unit keeps its weights gathered from the forward to the end of
the outer backward (the inner `torch.autograd.grad` runs FSDP's backward hooks, and the outer backward reaches the
weights through graph nodes no FSDP hook guards).
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


def build_model(ebt_type: str):
    """α = 2 keeps three SGD steps well conditioned: weights perturbed by 1e-6 end within 1e-5 (α = 5 amplifies the
    same perturbation to 0.4 by the third step, far beyond any comparison)."""
    from modeling_ebt import EBTForCausalLM
    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config(ebt_type=ebt_type, denoising_initial_condition="zeros", mcmc_step_size=2.0)
    return EBTForCausalLM(config).train()


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (BATCH, LENGTH), generator=generator) for _ in range(STEPS)]


def train(model, rank=0, world=1) -> list[float]:
    """Plain SGD on each process's share of every batch: equal shares, so the mean of the processes' mean losses is
    the full batch's mean loss and the gradients match one process on the full batch. Returns each step's gradient
    norm as the Trainer's clipping computes it, from `model.parameters()` after the backward."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    norms = []
    for batch in batches():
        mine = batch.chunk(world)[rank]
        model(mine, labels=mine).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # a DTensor over sharded gradients
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        optimizer.step()
        optimizer.zero_grad()
    return norms


def shard(model, preparation: str):
    """`fully_shard`: each decoder layer a unit, the root another. `accelerate`: accelerate's own FSDP2 preparation
    (the layers, the token embedding, the final norm and the root), which `Accelerator.prepare` applies only on
    GPUs: accelerate 1.15 sets FSDP for MULTI_GPU-like runs and never for MULTI_CPU, so the test calls it directly
    on a CPU accelerator given the plugin."""
    if preparation == "fully_shard":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator = Accelerator(cpu=True)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["EBTDecoderLayer"],
        reshard_after_forward=True)  # as configuration/accelerate/fsdp.yaml asks; the model overrides it
    return fsdp2_prepare_model(accelerator, model)


def run_sharded(ebt_type: str, preparation: str, output: str) -> None:
    """One process of the two: shard, train, save the gathered weights."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = shard(build_model(ebt_type), preparation)
    units = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    assert units[:1] == [""] and {"model.layers.0", "model.layers.1"} <= set(units), units
    norms = train(model, dist.get_rank(), dist.get_world_size())
    state = {name: value.full_tensor() if hasattr(value, "full_tensor") else value
             for name, value in model.state_dict().items()}
    state["gradient norms"] = torch.tensor(norms)
    if dist.get_rank() == 0:
        torch.save(state, output)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("ebt_type", "preparation"),
                         [("default", "fully_shard"), ("time_embed", "fully_shard"), ("time_embed", "accelerate")])
def test_fsdp2_two_processes_reach_the_weights_of_one_process(tmp_path, ebt_type, preparation):
    output = tmp_path / "sharded.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), __file__, ebt_type, preparation, str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]

    model = build_model(ebt_type)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    norms = torch.tensor(train(model))
    one, two = model.state_dict(), torch.load(output)
    torch.testing.assert_close(two.pop("gradient norms"), norms, rtol=1e-5, atol=0)
    assert max(float((one[name] - initial[name]).abs().max()) for name in one) > 1e-3
    for name in one:  # float32 sums in another order, as in the DDP test (tests/test_accelerate.py)
        torch.testing.assert_close(two[name].reshape(one[name].shape), one[name], rtol=1e-4, atol=1e-5, msg=name)


if __name__ == "__main__":
    run_sharded(*sys.argv[1:])


def test_a_checkpoint_with_the_older_0d_alpha_loads_with_from_pretrained_and_load_state_dict(tmp_path):
    """α is a 1-element parameter (FSDP shards no 0-d ones); checkpoints of earlier versions and the reference's
    hold a 0-d α, and still load, to the same value."""
    from safetensors.torch import load_file, save_file

    from modeling_ebt import EBTForCausalLM

    model = build_model("default")
    with torch.no_grad():
        model.alpha.fill_(3.25)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert weights["alpha"].shape == (1,)
    weights["alpha"] = weights["alpha"].reshape(())
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})

    loaded = EBTForCausalLM.from_pretrained(tmp_path)
    assert loaded.alpha.shape == (1,) and loaded.alpha.item() == 3.25
    other = EBTForCausalLM(model.config)
    other.load_state_dict(weights)
    assert other.alpha.shape == (1,) and other.alpha.item() == 3.25
    batch = batches()[0][:1]
    torch.testing.assert_close(loaded.eval()(batch).logits, model.eval()(batch).logits, rtol=0, atol=0)
