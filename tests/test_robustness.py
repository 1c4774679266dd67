"""What a user must never meet silently: a diverging descent, malformed inputs, a generation past the context,
a resized vocabulary that the candidates do not see, evaluation noise that depends on the batch, half-precision
descent state, and a compiled energy function that changes the tokens."""

import pytest
import torch

from modeling_ebt import EBTConfig, EBTForCausalLM, ThinkingConfig
from modeling_ebt.modeling_ebt import check_inputs, hashed_normal

from .conftest import tiny_config, tiny_model


def ids_of(shape, seed=0, high=256):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# --- 11.5: a diverging update is an error, not a nan loss ---------------------------------------------------------

def test_an_overflowing_update_raises_and_names_the_step_size():
    torch.manual_seed(0)
    model = EBTForCausalLM(EBTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     max_position_embeddings=32, mcmc_step_size=1e38, mcmc_num_steps=1,
                                     ebt_type="default")).train()
    ids = ids_of((2, 8))
    with pytest.raises(FloatingPointError, match=r"non-finite update .* at descent step 0.*lower mcmc_step_size"):
        model(ids, labels=ids)
    model.eval()
    for thinking in (ThinkingConfig(), ThinkingConfig(energy_tolerance=1e-3)):  # fixed and adaptive descent
        with pytest.raises(FloatingPointError, match="non-finite update"):
            model(ids, thinking=thinking)
    ok = model(ids, thinking=ThinkingConfig(step_size=1.0))  # the override the message points to
    assert torch.isfinite(ok.logits).all()


# --- 11.7: malformed inputs ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=ids_of((2, 8)).bool()), "integer token ids .* got dtype torch.bool"),
    (dict(input_ids=ids_of((2, 8)).to(torch.uint8)), "got dtype torch.uint8"),
    (dict(input_ids=ids_of((2, 8)), attention_mask=torch.ones(2, 5, dtype=torch.long)),
     r"attention_mask must have shape .* \(2, 8\) .* got \(2, 5\)"),
    (dict(input_ids=ids_of((2, 8)), attention_mask=torch.ones(1, 8, dtype=torch.long)),
     r"attention_mask must have shape .* got \(1, 8\)"),
    (dict(input_ids=ids_of((2, 8)), logits_to_keep=-1), "logits_to_keep must be an integer >= 0 .* got -1"),
    (dict(input_ids=ids_of((2, 8)), logits_to_keep=1.5), "logits_to_keep must be an integer >= 0"),
])
def test_malformed_inputs_are_refused_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model()(**kwargs)


def test_input_checks_compile_without_a_graph_break():
    config = tiny_config()
    compiled = torch.compile(lambda ids: check_inputs(ids, config) or ids + 1, backend="eager", fullgraph=True)
    ids = ids_of((2, 8))
    assert torch.equal(compiled(ids), ids + 1)


def test_unknown_or_inapplicable_attention_implementations_are_refused():
    model = tiny_model()
    for name, message in (("bogus", "attn_implementation='bogus' cannot run an EBT: use 'eager' or 'sdpa'"),
                          ("flash_attention_2", "flash, flex and paged attention")):
        model.config._attn_implementation = name
        with pytest.raises(ValueError, match=message):
            model(ids_of((1, 4)))


# --- 12.6: generation past the context is refused before any work -------------------------------------------------

def test_generation_past_max_position_embeddings_is_refused_before_generating():
    model = tiny_model()  # max_position_embeddings=64
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"60 tokens \+ max_new_tokens=10\), more than the model's "
                                         r"max_position_embeddings=64: ask for at most max_new_tokens=4"):
        model.generate(ids_of((1, 60)), max_new_tokens=10)
    with pytest.raises(ValueError, match=r"\(max_length=100\), more than the model's max_position_embeddings=64"):
        model.generate(ids_of((1, 10)), max_length=100)
    assert calls == []  # refused before the first forward
    assert model.generate(ids_of((1, 60)), max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 64)


# --- 12.1: resizing the vocabulary resizes the candidates' embedding too --------------------------------------------

def test_resized_vocabulary_reaches_the_candidates_and_survives_save_and_load(tmp_path):
    model = tiny_model()
    old = model.model.vocab_to_embed.weight.detach().clone()
    model.resize_token_embeddings(300)
    assert model.config.vocab_size == 300 and model.model.vocab_to_embed.weight.shape == (32, 300)
    assert torch.equal(model.model.vocab_to_embed.weight[:, :257], old)  # kept tokens keep their columns
    torch.testing.assert_close(model.model.vocab_to_embed.weight[:, 299], old.mean(dim=1))
    ids = ids_of((2, 9), high=300)
    logits = model(ids).logits
    assert logits.shape == (2, 9, 300) and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = EBTForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(ids).logits, logits)


# --- 12.3: evaluation noise does not depend on the batch ------------------------------------------------------------

def test_evaluation_logits_of_a_sequence_do_not_depend_on_its_batch_or_the_run():
    model = tiny_model()
    ids = ids_of((3, 12))
    with torch.no_grad():
        alone = model(ids[1:2]).logits
        torch.manual_seed(123)  # the global RNG does not matter in evaluation
        in_batch = model(ids).logits
        reordered = model(ids[[2, 1, 0]]).logits
    torch.testing.assert_close(in_batch[1:2], alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(reordered[1:2], alone, rtol=0, atol=1e-6)
    # two evaluations give the same loss; training draws fresh noise
    assert model(ids, labels=ids).loss.item() == model(ids, labels=ids).loss.item()
    model.train()
    assert model(ids, labels=ids).loss.item() != model(ids, labels=ids).loss.item()


def test_left_padding_does_not_change_a_sequences_starting_noise_in_generation():
    model = tiny_model()
    prompt = ids_of((1, 10))
    padded = torch.cat((torch.full((1, 3), 256), prompt), dim=1)
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)), dim=1)
    alone = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    in_padding = model.generate(padded, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(in_padding[:, 3:], alone)


def test_hashed_noise_is_standard_normal_and_keyed():
    keys = torch.arange(4000)
    noise = hashed_normal(keys, 257)
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    assert torch.equal(hashed_normal(keys[[7, 3]], 257), noise[[7, 3]])
    corr = torch.corrcoef(torch.stack((noise[0], noise[1])))[0, 1]
    assert abs(corr.item()) < 0.2  # neighbouring keys are independent draws


# --- 12.4: half-precision weights, float32 descent state -----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_keep_the_descent_state_in_float32(dtype):
    model = tiny_model().to(dtype)
    ids = ids_of((2, 12))
    out = model(ids, output_step_logits=True, output_final_energies=True)
    assert out.logits.dtype == out.step_logits.dtype == out.energies.dtype == torch.float32
    assert torch.isfinite(out.step_logits).all()
    model.train()
    train = model(ids, labels=ids)
    train.loss.backward()
    assert train.loss.dtype == torch.float32 and model.alpha.grad is not None


def test_float16_energies_that_overflow_raise_instead_of_returning_non_finite_logits():
    model = tiny_model(ebt_type="default").to(torch.float16)
    with torch.no_grad():
        model.model.energy_head.weight.fill_(6e4)  # energies beyond float16's range
    with pytest.raises(FloatingPointError, match="non-finite energy"):
        model(ids_of((1, 6)))


def _trained_tiny_model(steps):
    """A tiny model trained (System 1 recipe: time_embed, α 500 learnable) to continue counting modulo 64."""
    from modeling_ebt.training import ebt_optimizer_groups

    torch.manual_seed(0)
    model = EBTForCausalLM(tiny_config(ebt_type="time_embed", mcmc_step_size=500.0)).train()
    optimizer = torch.optim.AdamW(ebt_optimizer_groups(model, 0.0, 3e-3), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = (torch.randint(0, 64, (16, 1), generator=generator) + torch.arange(24)) % 64
        model(ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.slow
def test_bfloat16_weights_agree_with_float32_on_greedy_tokens_of_a_trained_model():
    model = _trained_tiny_model(steps=300)
    ids = (torch.arange(64)[:, None] + torch.arange(24)) % 64  # every start
    with torch.no_grad():
        fp32_logits = model(ids).logits
        bf16_logits = model.to(torch.bfloat16)(ids).logits
    fp32, bf16 = fp32_logits.argmax(-1), bf16_logits.argmax(-1)
    accuracy = (fp32[:, :-1] == ids[:, 1:]).float().mean().item()
    agreement = (fp32 == bf16).float().mean().item()
    difference = ((bf16_logits.float() - fp32_logits).norm() / fp32_logits.norm()).item()
    print(f"fp32 next-token accuracy {accuracy:.4f}; bf16 vs fp32 greedy-token agreement {agreement:.4f} "
          f"of {fp32.numel()} positions; logits relative difference (Frobenius) {difference:.4f}")
    assert accuracy >= 0.9  # a trained model, not noise
    assert agreement >= 0.99
    assert difference < 0.05  # bf16's 8-bit mantissa, not a different prediction


# --- 12.5: compiled energy function --------------------------------------------------------------------------------

def test_compiled_energy_generates_the_tokens_of_eager_without_graph_breaks():
    # backend="eager" runs dynamo's capture only (fast); fullgraph=True fails on any graph break in the energy
    model = tiny_model(denoising_initial_condition="zeros")
    prompt = ids_of((1, 8))
    eager = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert model.compile_energy(backend="eager", fullgraph=True, dynamic=True) is model
    calls = []
    compiled_energy = model.compiled_energy
    model.compiled_energy = lambda *args: calls.append(1) or compiled_energy(*args)
    assert torch.equal(model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False), eager)
    assert len(calls) == 4 * 2  # every descent step of every new token went through the compiled function


@pytest.mark.slow
def test_inductor_compiled_energy_generates_the_tokens_of_eager():
    model = tiny_model(denoising_initial_condition="zeros")
    prompt = ids_of((1, 8))
    eager = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    compiled = model.compile_energy(dynamic=True).generate(prompt, max_new_tokens=6, min_new_tokens=6,
                                                           do_sample=False)
    assert torch.equal(compiled, eager)
