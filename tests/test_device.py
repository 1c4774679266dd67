"""The behaviours that depend on the device, run on `EBT_TEST_DEVICE` (default cpu; scripts/device_check.sh sets cuda):
float32 parity with the reference, bf16 generation, a Trainer step, sdpa = eager, and FSDP with more than one GPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from .conftest import tiny_model
from .test_accelerate import REPO, TRAIN_FLAGS, write_corpus
from .test_parity import reference, relative_error  # noqa: F401  (reference is a fixture)

DEVICE = torch.device(os.environ.get("EBT_TEST_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(f"EBT_TEST_DEVICE={DEVICE} but torch {torch.__version__} sees no CUDA device (built with CUDA "
                       f"{torch.version.cuda}): unset EBT_TEST_DEVICE to test on the CPU")


def on_device(batch: dict) -> dict:
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_parity_in_float32_on_the_device(reference):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(reference["model_dir"]).train().to(DEVICE)
    expected, meta = on_device(reference["expected"]), reference["meta"]
    input_ids = expected["input_ids"]
    initial = torch.cat((expected["initial_logits"], torch.zeros(input_ids.shape[0], 1, 257, device=DEVICE)), dim=1)
    out = model(input_ids, labels=input_ids, initial_logits=initial, output_step_logits=True)
    assert out.logits.device.type == DEVICE.type
    assert relative_error(out.energies[:, :, :16].detach(), expected["step_energies"]) <= 1e-4
    assert relative_error(out.step_logits[:, :, :16].detach(), expected["step_logits"]) <= 1e-3
    assert abs(out.loss.item() - meta["loss"]) / meta["loss"] <= 1e-4
    out.loss.backward()
    alpha = meta["grads_after_loss_backward"]["alpha"]
    assert abs(model.alpha.grad.item() - alpha) / abs(alpha) <= 1e-4


def test_bf16_weights_generate_finite_energies_close_to_float32():
    full = tiny_model(denoising_initial_condition="zeros").to(DEVICE)
    half = tiny_model(denoising_initial_condition="zeros").to(DEVICE, torch.bfloat16)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    out = half.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                        return_dict_in_generate=True)
    assert out.sequences.shape == (2, 12) and torch.equal(out.sequences[:, :8], ids)
    assert int(out.sequences.min()) >= 0 and int(out.sequences.max()) < 257
    assert out.energies.shape[:2] == (2, 4) and bool(torch.isfinite(out.energies.float()).all())
    # bf16 keeps 8 bits of mantissa; the descent amplifies its round-off (12% observed on the CPU), a broken kernel
    # or a dtype mix-up gives unrelated energies
    energies, reference_energies = half(ids).energies.detach().float(), full(ids).energies.detach()
    assert relative_error(energies, reference_energies) < 0.25


def test_a_trainer_step_on_the_device(tmp_path):
    model = tiny_model().train()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                             report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=DEVICE.type == "cpu")
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert model.device.type == DEVICE.type
    assert torch.isfinite(torch.tensor(result.training_loss)) and result.training_loss > 0
    moved = (model.model.layers[0].self_attn.q_proj.weight.detach().cpu() - before).abs().max()
    assert moved > 1e-4


def test_sdpa_equals_eager_with_second_order_gradients_on_the_device():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    initial = torch.randn(2, 12, 257, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_model(ebt_type="time_embed").train().to(DEVICE)
        model.config._attn_implementation = implementation
        out = model(ids, labels=ids, initial_logits=initial)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), model.model.layers[0].self_attn.q_proj.weight.grad)
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1], rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.device_count() < 2, reason="FSDP needs more than one GPU")
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not on PATH")
def test_fsdp_trains_on_two_gpus(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    command = ["accelerate", "launch", "--config_file", str(REPO / "configuration" / "accelerate" / "fsdp.yaml"),
               "--num_processes", "2", "-m", "modeling_ebt.cli", "train", "--corpus", str(corpus), "--cache-dir",
               str(tmp_path / "cache"), *TRAIN_FLAGS, "--output-dir", str(tmp_path / "out"), "--batch-size", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["distributed_type"] == "FSDP" and summary["steps"] == 3
