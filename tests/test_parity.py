"""Parity with the reference implementation: converted fixtures reproduce its energies, logits, loss, gradient
norms and greedy generation (../shared/fixtures/reference_ebt, produced by the unmodified reference code)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_ebt.convert_reference_checkpoint import convert, interleaved_to_halves

from .conftest import REFERENCE_FIXTURES, require_shared

VARIANTS = ["default", "time_embed"]


def relative_error(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module", params=VARIANTS)
def reference(request, tmp_path_factory):
    folder = require_shared(REFERENCE_FIXTURES / request.param)
    out = tmp_path_factory.mktemp(request.param)
    convert(folder / "reference.ckpt", out)
    return {
        "variant": request.param,
        "model_dir": out,
        "expected": load_file(str(folder / "expected.safetensors")),
        "meta": json.loads((folder / "meta.json").read_text()),
        "folder": folder,
    }


def run_fixture_batch(model, expected):
    """The fixture's descent: observed = input_ids[:, :-1], fixed initial logits. Our forward takes the whole
    sequence (labels shifted inside); the extra last position's candidate cannot influence the others."""
    input_ids = expected["input_ids"]
    initial = torch.cat((expected["initial_logits"], torch.zeros(input_ids.shape[0], 1, 257)), dim=1)
    return model(input_ids, labels=input_ids, initial_logits=initial, output_step_logits=True)


def test_energies_logits_and_loss_match_reference(reference):
    model = AutoModelForCausalLM.from_pretrained(reference["model_dir"]).train()
    expected, meta = reference["expected"], reference["meta"]
    out = run_fixture_batch(model, expected)
    assert relative_error(out.energies[:, :, :16].detach(), expected["step_energies"]) <= 1e-4
    assert relative_error(out.step_logits[:, :, :16].detach(), expected["step_logits"]) <= 1e-3
    assert abs(out.loss.item() - meta["loss"]) / meta["loss"] <= 1e-4
    assert abs(out.step_losses[0].item() - meta["initial_step_loss"]) / meta["initial_step_loss"] <= 1e-4
    assert abs(out.step_losses[-1].item() - meta["final_step_loss"]) / meta["final_step_loss"] <= 1e-4


def test_gradient_norms_match_reference(reference):
    model = AutoModelForCausalLM.from_pretrained(reference["model_dir"]).train()
    run_fixture_batch(model, reference["expected"]).loss.backward()
    inner = model.model
    measured = {
        "alpha": model.alpha.grad.item(),
        "energy_head_grad_norm": inner.energy_head.weight.grad.norm().item(),
        "embeddings_grad_norm": inner.embed_tokens.weight.grad.norm().item(),
        "vocab_to_embed_grad_norm": inner.vocab_to_embed.weight.grad.norm().item(),
        "layer0_wq_grad_norm": inner.layers[0].self_attn.q_proj.weight.grad.norm().item(),
    }
    for name, value in reference["meta"]["grads_after_loss_backward"].items():
        assert abs(measured[name] - value) / abs(value) <= 1e-4, name


@pytest.mark.parametrize("recompute", [False, True], ids=["cached", "recompute"])
def test_greedy_generation_matches_reference(reference, recompute):
    model = AutoModelForCausalLM.from_pretrained(reference["model_dir"], denoising_initial_condition="zeros")
    expected = reference["expected"]
    tokens = model.generate(expected["generation_prompt"], max_new_tokens=8, do_sample=False, recompute=recompute)
    assert tokens.tolist() == expected["generation_tokens"].tolist()


def test_safetensors_input_converts_to_the_same_model(reference, tmp_path):
    hparams = reference["meta"]["hyper_parameters"]
    cmd = [sys.executable, "-m", "modeling_ebt.convert_reference_checkpoint",
           str(reference["folder"] / "reference_state_dict.safetensors"), str(tmp_path),
           "--num-attention-heads", str(hparams["multiheaded_attention_heads"]),
           "--context-length", str(hparams["context_length"])]
    subprocess.run(cmd, check=True, capture_output=True)
    from_ckpt = load_file(str(reference["model_dir"] / "model.safetensors"))
    from_safetensors = load_file(str(tmp_path / "model.safetensors"))
    assert from_ckpt.keys() == from_safetensors.keys()
    assert all(torch.equal(from_ckpt[k], from_safetensors[k]) for k in from_ckpt)


def test_safetensors_input_without_sizes_is_a_clear_error(reference, tmp_path):
    with pytest.raises(ValueError, match="--num-attention-heads and --context-length"):
        convert(reference["folder"] / "reference_state_dict.safetensors", tmp_path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no reference checkpoint"):
        convert(tmp_path / "absent.ckpt", tmp_path / "out")


def test_rope_row_permutation_turns_adjacent_pairs_into_halves():
    head_dim, heads = 4, 2
    weight = torch.arange(heads * head_dim, dtype=torch.float).unsqueeze(1)  # row i holds i
    assert interleaved_to_halves(weight, head_dim).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
