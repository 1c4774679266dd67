"""The model: save/load and Auto classes, the efficient streams against the reference-style recompute path,
attention implementations, GQA, and clear errors for bad input."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modeling_ebt import EBTConfig, EBTForCausalLM, EBTModel, ThinkingConfig
from modeling_ebt.replay_buffer import ReplayBuffer

from .conftest import tiny_config, tiny_model

VARIANTS = ["default", "time_embed"]


def batch(seed=1, shape=(2, 12)):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


def test_config_defaults_are_the_papers_system1_recipe():
    config = EBTConfig()
    assert (config.ebt_type, config.mcmc_num_steps, config.mcmc_step_size) == ("time_embed", 2, 500.0)
    assert config.mcmc_step_size_lr_multiplier == 1500.0 and config.mcmc_step_size_learnable
    assert config.normalize_initial_condition and config.denoising_initial_condition == "random_noise"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 6)
    assert config.intermediate_size == 384 and config.num_key_value_heads == 6


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 30, "hidden_size=30 is invalid: expected a multiple of num_attention_heads=4"),
    ("num_key_value_heads", 3, "num_key_value_heads=3 is invalid: expected a divisor of num_attention_heads"),
    ("ebt_type", "adaln", "ebt_type='adaln' is invalid: expected one of"),
    ("mcmc_num_steps", 0, "mcmc_num_steps=0 is invalid: expected an integer >= 1"),
    ("checkpointing_chunks", 0, "checkpointing_chunks=0 is invalid: expected an integer >= 1"),
    ("mcmc_step_size", 0.0, "mcmc_step_size=0.0 is invalid: expected a number > 0"),
    ("langevin_dynamics_noise", -1.0, "langevin_dynamics_noise=-1.0 is invalid: expected a number >= 0"),
    ("denoising_initial_condition", "ones", "denoising_initial_condition='ones' is invalid"),
    ("randomize_mcmc_step_size_scale", 0.5, "randomize_mcmc_step_size_scale=0.5 is invalid"),
    ("sliding_window", 0, "sliding_window=0 is invalid: expected None or an integer in [1, max_position_embeddings"),
    ("sliding_window", 65, "sliding_window=65 is invalid"),
    ("num_sink_tokens", 2, "num_sink_tokens=2 is invalid: expected 0 without a sliding_window"),
    ("num_sink_tokens", -1, "num_sink_tokens=-1 is invalid: expected an integer in [0, max_position_embeddings"),
    ("vocab_size", 0, "vocab_size=0 is invalid"),
    ("truncate_mcmc", "yes", "truncate_mcmc='yes' is invalid: expected True or False"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True is invalid"),
    ("ranking_num_candidates", 1, "ranking_num_candidates=1 is invalid: expected an integer >= 2"),
    ("ranking_loss_coeff", -0.5, "ranking_loss_coeff=-0.5 is invalid: expected a number >= 0"),
])
def test_invalid_config_values_are_rejected_with_the_field_name(field, value, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**{field: value})
    assert message in str(error.value)


def test_config_round_trips_through_auto_config(tmp_path):
    config = tiny_config(ebt_type="default", mcmc_num_steps=3, langevin_dynamics_noise=0.5, sliding_window=16)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, EBTConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert (loaded.ebt_type, loaded.mcmc_num_steps, loaded.sliding_window) == ("default", 3, 16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_round_trips_bit_identically_through_auto_classes(variant, tmp_path):
    model = tiny_model(ebt_type=variant)
    ids = batch()
    initial = torch.randn(2, 12, 257)
    before = model(ids, initial_logits=initial)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EBTForCausalLM)
    after = loaded(ids, initial_logits=initial)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.energies, after.energies)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, EBTModel)
    probs = torch.softmax(initial, -1)
    energies = base(ids, candidate_probs=probs).energies
    torch.testing.assert_close(energies, before.energies[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_efficient_streams_equal_the_reference_style_recompute(variant):
    model = tiny_model(ebt_type=variant, mcmc_num_steps=3).train()
    ids, initial = batch(), torch.randn(2, 12, 257)
    fast = model(ids, labels=ids, initial_logits=initial)
    slow = model(ids, labels=ids, initial_logits=initial, thinking=ThinkingConfig(recompute=True))
    # the first step is one forward: float32 round-off only; each descent step amplifies it (~10× per step)
    torch.testing.assert_close(fast.energies[0], slow.energies[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.energies, slow.energies, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-4, atol=1e-4)
    fast_grads = torch.autograd.grad(fast.loss, model.alpha)
    slow_grads = torch.autograd.grad(slow.loss, model.alpha)
    torch.testing.assert_close(fast_grads, slow_grads, rtol=1e-4, atol=1e-5)


def test_padding_positions_do_not_change_the_other_positions():
    model = tiny_model(ebt_type="time_embed")
    ids = batch(shape=(1, 10))
    initial = torch.randn(1, 10, 257)
    padded = torch.cat((torch.full((1, 3), 256), ids), dim=1)
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)), dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = model(ids, initial_logits=initial)
    with_pad = model(padded, attention_mask=mask, position_ids=positions,
                     initial_logits=torch.cat((torch.zeros(1, 3, 257), initial), dim=1))
    torch.testing.assert_close(with_pad.energies[0, :, 3:], plain.energies[0], rtol=1e-5, atol=1e-5)
    # later steps differ by float32 round-off amplified by the descent (different summation order over keys)
    torch.testing.assert_close(with_pad.logits[:, 3:], plain.logits, rtol=1e-2, atol=1e-2)
    assert torch.equal(with_pad.logits[:, 3:].argmax(-1), plain.logits.argmax(-1))


def test_sdpa_and_eager_attention_agree():
    model = tiny_model(ebt_type="time_embed")
    ids, initial = batch(), torch.randn(2, 12, 257)
    model.config._attn_implementation = "eager"
    eager = model(ids, initial_logits=initial)
    model.config._attn_implementation = "sdpa"
    sdpa = model(ids, initial_logits=initial)
    torch.testing.assert_close(eager.logits, sdpa.logits, rtol=1e-5, atol=1e-5)


def test_training_with_sdpa_uses_the_math_path_for_second_order_gradients():
    model = tiny_model(ebt_type="default").train()
    model.config._attn_implementation = "sdpa"
    ids = batch()
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_grouped_query_attention_equals_mha_with_repeated_key_value_heads():
    gqa = tiny_model(num_key_value_heads=2)
    mha = EBTForCausalLM(tiny_config(num_key_value_heads=4)).eval()
    state = gqa.state_dict()
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # 2 kv heads of 8 dims → each used by 2 queries
            state[name] = state[name].view(2, 8, -1).repeat_interleave(2, dim=0).reshape(32, -1)
    mha.load_state_dict(state)
    ids, initial = batch(), torch.randn(2, 12, 257)
    gqa_out, mha_out = gqa(ids, initial_logits=initial), mha(ids, initial_logits=initial)
    torch.testing.assert_close(gqa_out.energies, mha_out.energies, rtol=1e-4, atol=1e-4)
    assert gqa.model.layers[0].self_attn.k_proj.weight.shape == (16, 32)


def test_logits_predict_the_next_token_and_loss_ignores_padding_and_minus_100():
    model = tiny_model()
    ids = batch()
    initial = torch.randn(2, 12, 257)
    labels = ids.clone()
    labels[0, 5] = -100
    mask = torch.ones_like(ids)
    mask[1, 8] = 0
    out = model(ids, labels=labels, attention_mask=mask, initial_logits=initial, output_step_logits=True)
    targets = torch.cat((labels[:, 1:], torch.full((2, 1), -100)), dim=1)
    targets[1, 7] = -100  # the target at padding position 8 is predicted from position 7
    per_step = [torch.nn.functional.cross_entropy(step.reshape(-1, 257), targets.reshape(-1), ignore_index=-100)
                for step in out.step_logits]
    torch.testing.assert_close(out.loss, torch.stack(per_step).mean())


def test_forward_under_no_grad_and_inference_mode_descends():
    model = tiny_model()
    ids, initial = batch(), torch.randn(2, 12, 257)
    reference = model(ids, initial_logits=initial)  # grad enabled: explicit-softmax attention
    with torch.no_grad():
        no_grad = model(ids, initial_logits=initial)
    with torch.inference_mode():
        inference = model(ids, initial_logits=initial)
    assert torch.equal(no_grad.logits, inference.logits) and not no_grad.logits.requires_grad
    torch.testing.assert_close(no_grad.energies[0], reference.energies[0].detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(no_grad.logits.argmax(-1), reference.logits.argmax(-1))


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([[1, 2, 257]]), "token id 257, outside the model's vocabulary [0, 256]"),
    (torch.tensor([[1, -3, 2]]), "token id -3, outside the model's vocabulary"),
    (torch.zeros(1, 65, dtype=torch.long), "of 65 tokens is longer than the model's max_position_embeddings=64"),
    (torch.zeros(1, 0, dtype=torch.long), "input_ids must be a non-empty batch × sequence tensor"),
])
def test_bad_input_ids_are_rejected(ids, message):
    with pytest.raises(ValueError) as error:
        tiny_model()(ids)
    assert message in str(error.value)


def test_mismatched_initial_logits_shape_is_rejected():
    with pytest.raises(ValueError, match=r"initial_logits must have the shape of the logits.*\(2, 12, 257\)"):
        tiny_model()(batch(), initial_logits=torch.zeros(2, 11, 257))


def test_non_finite_energies_during_descent_raise_a_clear_error():
    model = tiny_model()
    with torch.no_grad():
        model.model.energy_head.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite energy or energy gradient at descent step 0"):
        model(batch())


def test_system2_training_options_run_and_backpropagate():
    model = tiny_model(ebt_type="default", mcmc_num_steps=1, randomize_mcmc_num_steps=2,
                       randomize_mcmc_num_steps_min=2, randomize_mcmc_step_size_scale=2.0,
                       langevin_dynamics_noise=0.5, mcmc_replay_buffer=True, truncate_mcmc=True,
                       no_mcmc_detach=True, contrastive_loss_coeff=0.5).train()
    ids = batch(shape=(4, 12))
    first = model(ids, labels=ids)
    assert len(first.step_losses) in (2, 3)  # 1 landscape with 2..3 random steps
    first.loss.backward()
    assert torch.isfinite(model.alpha.grad)
    buffer = ReplayBuffer.for_config(model.config)
    buffer.add(ids, ids, first.logits)
    replayed = buffer.extend({"input_ids": ids, "labels": ids}, model)  # what EBTTrainer.compute_loss does
    second = model(**replayed)  # half the batch now comes from the replay buffer
    assert second.logits.shape[0] == 6
    # the replayed rows restart from the recorded final logits
    assert any(torch.equal(replayed["initial_logits"][4], row) for row in first.logits.detach())
    model.eval()
    assert len(model(ids, labels=ids).step_losses) == 3  # evaluation uses the maximum number of steps
    assert (model.config.fewest_training_steps, model.config.evaluation_steps) == (2, 3)
    model.train()  # the fewest and the most steps that training draws
    assert {len(model(ids, labels=ids).step_losses) for _ in range(30)} == {2, 3}


@pytest.mark.parametrize("num_candidates", [1, 3])
def test_contrastive_term_is_the_true_tokens_energy_ranked_below_the_prediction(num_candidates):
    import torch.nn.functional as F

    model = tiny_model(ebt_type="default", contrastive_loss_coeff=0.5)
    ids = batch(shape=(2, 10))
    with torch.no_grad():
        out = model(ids, labels=ids, thinking=ThinkingConfig(num_candidates=num_candidates))
        # E(one-hot of the next token), from outside: a start so peaked that its softmax is the one-hot itself
        nxt = torch.cat((ids[:, 1:], ids[:, :1]), dim=1)
        true_energy = model(ids, initial_logits=1e4 * F.one_hot(nxt, 257).float(),
                            thinking=ThinkingConfig(steps=1)).energies[0]
    contrastive = F.softplus(true_energy - out.energies[-1])[:, :-1].mean()  # the last position has no target
    torch.testing.assert_close(out.loss, out.step_losses.mean() + 0.5 * contrastive)


@pytest.mark.parametrize("ebt_type", VARIANTS)
def test_ranking_term_trains_the_final_energy_to_pick_the_best_of_the_candidates(ebt_type):
    """Training with `ranking_loss_coeff`: 3 candidates per position, every candidate's cross-entropy in the loss, plus
    the cross-entropy of softmax(−E_final) against the candidate that gives the true next token the highest
    probability; recomputed here from the candidates' final logits, their energies scored from outside."""
    import torch.nn.functional as F

    model = tiny_model(ebt_type=ebt_type, ranking_loss_coeff=0.5, ranking_num_candidates=3).train()
    seen = []
    select = model._select_candidates
    model._select_candidates = lambda descent, n: seen.append(descent) or select(descent, n)
    ids = batch(shape=(2, 10))
    out = model(ids, labels=ids)
    (descent,) = seen
    states = descent.states.detach().unflatten(2, (3, 10))  # steps × batch × candidates × positions × vocab
    assert not torch.equal(states[-1, :, 0], states[-1, :, 1])  # the candidates start from different noise
    targets = torch.cat((ids[:, 1:], torch.full_like(ids[:, :1], -100)), dim=1)
    step_losses = torch.stack([F.cross_entropy(step.flatten(0, 2), targets[:, None].expand(-1, 3, -1).flatten(),
                                               ignore_index=-100) for step in states])
    torch.testing.assert_close(out.step_losses, step_losses)
    with torch.no_grad():  # E(final logits of candidate c) on the last landscape, by the recompute path
        energies = torch.stack([model.model.energy_recompute(ids, F.softmax(states[-1, :, c], dim=-1),
                                                             model.config.num_landscapes - 1)
                                for c in range(3)], dim=-1)  # batch × positions × candidates
    log_probs = F.log_softmax(states[-1], dim=-1).gather(-1, targets.clamp(min=0)[:, None, :, None].expand(
        -1, 3, -1, 1)).squeeze(-1)  # batch × candidates × positions
    best = log_probs.argmax(dim=1)
    ranking = F.cross_entropy(-energies[:, :-1].flatten(0, 1), best[:, :-1].flatten())
    torch.testing.assert_close(out.loss, step_losses.mean() + 0.5 * ranking, rtol=1e-5, atol=1e-6)
    # self-verification keeps, per position, the candidate of lowest final energy
    torch.testing.assert_close(out.final_energies, energies.min(dim=-1).values, rtol=1e-5, atol=1e-6)
    picked = energies.argmin(dim=-1)
    torch.testing.assert_close(out.logits, states[-1].gather(1, picked[:, None, :, None].expand(-1, 1, -1, 257))[:, 0])


@pytest.mark.parametrize("fields, fewest, most", [
    (dict(mcmc_num_steps=2), 2, 2),
    (dict(mcmc_num_steps=3, randomize_mcmc_num_steps=4, randomize_mcmc_num_steps_min=1), 3, 7),
    (dict(mcmc_num_steps=1, randomize_mcmc_num_steps=5, randomize_mcmc_num_steps_min=2), 2, 6),
])
def test_fewest_and_most_training_steps_are_those_training_draws(fields, fewest, most):
    model = tiny_model(ebt_type="time_embed", **fields).train()
    drawn = {len(model.step_schedule(ThinkingConfig())) for _ in range(200)}
    assert (model.config.fewest_training_steps, model.config.evaluation_steps) == (fewest, most)
    assert drawn == set(range(fewest, most + 1))


@pytest.mark.parametrize("options", [
    dict(ebt_type="default"),
    dict(ebt_type="time_embed", mcmc_num_steps=3),
    dict(ebt_type="default", no_mcmc_detach=True, langevin_dynamics_noise=0.3, randomize_mcmc_step_size_scale=2.0,
         contrastive_loss_coeff=0.5),
    dict(ebt_type="time_embed", truncate_mcmc=True),
    dict(ebt_type="default", checkpointing_chunks=1),
    dict(ebt_type="time_embed", checkpointing_chunks=2, padded=True),
    dict(ebt_type="default", sliding_window=3, padded=True),
], ids=["default", "time_embed", "no_detach_noise", "truncated", "one_chunk", "chunks_padding", "window_padding"])
def test_activation_checkpointing_recomputes_each_step_and_gives_the_same_gradients(options):
    options = dict(options)
    padded = options.pop("padded", False)

    def train_step(checkpointing):
        model = tiny_model(**options).double().train()  # float64: no round-off for the descent to amplify
        if checkpointing:
            model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing == checkpointing
        calls = []
        energy = model.model.energy
        model.model.energy = lambda *args, **kwargs: calls.append(1) or energy(*args, **kwargs)
        torch.manual_seed(3)  # the same initial noise, Langevin noise and step-size scales in both runs
        ids = batch(shape=(3, 12))
        mask = torch.ones_like(ids)
        if padded:  # left padding of different lengths: the candidates' masks have one row per sequence
            mask[0, :4], mask[2, :7] = 0, 0
        out = model(ids, labels=ids, attention_mask=mask)
        forward_calls = len(calls)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return out, grads, forward_calls, len(calls) - forward_calls

    plain, plain_grads, plain_forward, plain_recomputed = train_step(False)
    checkpointed, grads, forward, recomputed = train_step(True)
    assert plain_recomputed == 0
    # the forward runs each step's energy once per slice of the batch (nothing is recomputed there); every descent
    # step whose second-order graph is kept is rebuilt once in the backward, `checkpointing_chunks` slices of 3 rows
    slices = {1: 1, 2: 2}.get(options.get("checkpointing_chunks"), 3)  # default 4 chunks: one row each
    kept = 1 if options.get("truncate_mcmc") else len(plain.energies)
    assert plain_forward == len(plain.energies) + bool(options.get("contrastive_loss_coeff"))
    assert forward == plain_forward + (slices - 1) * kept
    assert recomputed == slices * kept
    # slices of the batch and per-step gradient sums change only the float operations' order
    torch.testing.assert_close(checkpointed.loss, plain.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(checkpointed.energies, plain.energies, rtol=1e-12, atol=1e-12)
    assert grads.keys() == plain_grads.keys() and "alpha" in grads
    for name in grads:
        scale = float(plain_grads[name].abs().max())
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-10, atol=1e-12 * scale, msg=name)


def test_activation_checkpointing_rebuilds_under_the_forwards_bf16_autocast():
    # the rebuilt step runs under the autocast of its forward (the Trainer's bf16=True): bf16 matrix products, the
    # descent state in float32, and the gradients of the plain autocast step
    def train_step(checkpointing):
        model = tiny_model(checkpointing_chunks=1).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        autocast_on = []
        energy = model.model.energy
        model.model.energy = lambda *a, **k: autocast_on.append(torch.is_autocast_enabled("cpu")) or energy(*a, **k)
        torch.manual_seed(3)
        ids = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, labels=ids, output_step_logits=True)
        out.loss.backward()  # outside the autocast region, as the Trainer calls it
        return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, autocast_on

    plain, plain_grads, _ = train_step(False)
    checkpointed, grads, autocast_on = train_step(True)
    assert autocast_on == [True] * 4  # two steps forward, two rebuilt in the backward
    assert checkpointed.step_logits.dtype == torch.float32 and checkpointed.energies.dtype == torch.float32
    torch.testing.assert_close(checkpointed.loss, plain.loss, rtol=0, atol=0)  # the same operations forward
    assert grads.keys() == plain_grads.keys()
    for name in grads:  # without checkpointing, a weight's gradients over the steps are summed in bf16 (at its
        scale = float(plain_grads[name].abs().max())  # autocast copy); rebuilt, each step's reaches it in float32
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=0, atol=2e-2 * scale, msg=name)


def test_activation_checkpointing_refuses_the_reentrant_variant_and_can_be_disabled():
    model = tiny_model()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.activation_checkpointing_enable()
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing


@pytest.mark.parametrize("variant", VARIANTS)
def test_in_float64_the_efficient_streams_equal_recompute_to_round_off(variant):
    # the float32 differences above are round-off amplified by the descent: in float64 they vanish
    model = tiny_model(ebt_type=variant, mcmc_num_steps=3).double().train()
    ids, initial = batch(), torch.randn(2, 12, 257, dtype=torch.float64)
    fast = model(ids, labels=ids, initial_logits=initial)
    slow = model(ids, labels=ids, initial_logits=initial, thinking=ThinkingConfig(recompute=True))
    assert fast.logits.dtype == torch.float64
    torch.testing.assert_close(fast.energies, slow.energies, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-10, atol=1e-10)
