"""Energy-descent generation: the cached `generate` against the recompute mode, batching, sampling, streamers,
the thinking knobs (steps, candidates, adaptive stop), and clear errors."""

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList, pipeline
from transformers.generation.streamers import BaseStreamer

from modeling_ebt import EBTTokenizer, ThinkingConfig

from .conftest import tiny_model

VARIANTS = ["default", "time_embed"]


@pytest.fixture(scope="module")
def tokenizer():
    tok = EBTTokenizer()
    tok.padding_side = "left"
    return tok


def greedy(model, **inputs):
    return model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_greedy_generation_equals_recompute_mode(variant, tokenizer):
    model = tiny_model(ebt_type=variant, denoising_initial_condition="zeros")
    inputs = tokenizer(["To be, or not", "Now is the winter"], return_tensors="pt", padding=True)
    assert torch.equal(greedy(model, **inputs), greedy(model, **inputs, recompute=True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padded_batch_equals_one_by_one(variant, tokenizer):
    model = tiny_model(ebt_type=variant, denoising_initial_condition="zeros")
    prompts = ["O Romeo", "A horse! a horse! my kingdom", "Friends, Romans"]
    batched = greedy(model, **tokenizer(prompts, return_tensors="pt", padding=True))[:, -6:]
    singles = torch.cat([greedy(model, **tokenizer(p, return_tensors="pt"))[:, -6:] for p in prompts])
    assert torch.equal(batched, singles)


def test_sampling_is_reproducible_with_a_seed(tokenizer):
    model = tiny_model()  # random-noise initial logits and sampling both draw from the seed
    inputs = tokenizer(["Once more unto"], return_tensors="pt")

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                              num_return_sequences=3)

    first, second, other = sample(0), sample(0), sample(1)
    assert first.shape == (3, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(first, second) and not torch.equal(first, other)


def test_streamer_stopping_criteria_and_eos(tokenizer):
    model = tiny_model(denoising_initial_condition="zeros")
    inputs = tokenizer("Is this a dagger", return_tensors="pt")
    full = greedy(model, **inputs)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    streamer = Collect()
    greedy(model, **inputs, streamer=streamer)
    assert streamer.chunks[0] == inputs["input_ids"][0].tolist()
    assert sum(streamer.chunks[1:-1], []) == full[0, -6:].tolist() and streamer.chunks[-1] == "end"

    class StopAfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= inputs["input_ids"].shape[1] + 3)

    stopped = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([StopAfterThree()]))
    assert torch.equal(stopped, full[:, :-3])
    eos = int(full[0, -4])  # declare the 3rd generated token the end of sequence
    ended = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert ended[0].tolist() == full[0, :-3].tolist()


def test_pipeline_text_generation(tokenizer):
    model = tiny_model(denoising_initial_condition="zeros")
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("Good night, good night!", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    expected = greedy(model, **tokenizer("Good night, good night!", return_tensors="pt"))[0, :-1]
    assert text == tokenizer.decode(expected)


def test_generate_output_carries_scores_energies_and_steps(tokenizer):
    model = tiny_model(ebt_type="time_embed", denoising_initial_condition="zeros")
    inputs = tokenizer(["Fair is foul", "and foul is fair"], return_tensors="pt", padding=True)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, mcmc_num_steps=3)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + 4)
    assert len(out.scores) == 4 and out.energies.shape == (2, 4)
    assert out.descent_steps.tolist() == [[3] * 4] * 2
    # the energy reported for the first new token is the energy of its final logits, recomputed independently
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    first = model(**inputs, position_ids=positions, logits_to_keep=1,
                  thinking=ThinkingConfig(steps=3, recompute=True), output_final_energies=True)
    torch.testing.assert_close(out.energies[:, :1], first.final_energies, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.scores[0].argmax(-1), out.sequences[:, inputs["input_ids"].shape[1]])


def test_more_steps_never_raise_the_final_energy_of_plain_gradient_descent():
    # with normalize_initial_condition=False the update z ← z − α ∂E/∂z is gradient descent on z; with a small
    # step it cannot increase a smooth energy, so thinking longer must never end higher
    model = tiny_model(ebt_type="default", normalize_initial_condition=False, mcmc_step_size=1e-3)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    initial = torch.randn(2, 10, 257)
    finals = [model(ids, initial_logits=initial, thinking=ThinkingConfig(steps=steps),
                    output_final_energies=True).final_energies
              for steps in (1, 2, 4, 8)]
    for fewer, more in zip(finals, finals[1:]):
        assert (more <= fewer + 1e-6).all()
    assert (finals[-1] < finals[0]).all()


def test_more_candidates_never_raise_the_selected_final_energy():
    model = tiny_model(ebt_type="time_embed")
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    finals = []
    for candidates in (1, 2, 4, 8):
        # in evaluation candidate c starts from noise fixed by (position, c), whatever the number of candidates
        out = model(ids, thinking=ThinkingConfig(num_candidates=candidates), output_final_energies=True)
        finals.append(out.final_energies)
    for fewer, more in zip(finals, finals[1:]):  # equal choices may differ by round-off of the batch layout
        assert (more <= fewer + 1e-4).all()
    assert (finals[-1] < finals[0] - 1e-3).any()


def test_adaptive_descent_uses_fewer_steps_on_easy_positions():
    # with a tiny step the descent is close to iterating p ← softmax(p): positions that start at the uniform
    # distribution (its fixed point) are easy, positions that start from peaked random logits are hard
    model = tiny_model(ebt_type="default", mcmc_step_size=1e-3)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    start = torch.cat((torch.zeros(1, 4, 257), torch.randn(1, 4, 257) * 5), dim=1)
    out = model(ids, initial_logits=start, thinking=ThinkingConfig(steps=50, energy_tolerance=1e-3))
    steps = out.descent_steps[0]  # (with this seed, two of the four uniform starts settle within the budget)
    assert steps[:2].max() < steps[4:].min()
    assert steps[:2].max() < 10 and steps[4:].min() == 50
    fixed = model(ids, initial_logits=start, thinking=ThinkingConfig(steps=50))
    assert fixed.descent_steps.unique().tolist() == [50]


def test_accepting_only_lower_energies_keeps_a_step_where_it_lowers_the_energy_and_the_start_elsewhere():
    # a large step on random weights overshoots at some positions: there the energy rises, and the state stays put
    model = tiny_model(ebt_type="default", mcmc_step_size=300.0)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    start = torch.randn(2, 9, 257, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # both runs on the same kernels (α amplifies round-off)
        plain = model(ids, initial_logits=start, thinking=ThinkingConfig(steps=1), output_final_energies=True)
        accepted = model(ids, initial_logits=start, thinking=ThinkingConfig(steps=1, accept_lower_energies=True))
    lower = plain.final_energies < plain.energies[0]  # E(softmax(z1)) against E(softmax(z0)), per position
    assert lower.any() and not lower.all()
    torch.testing.assert_close(accepted.logits, torch.where(lower[..., None], plain.logits, start))


def test_accepting_only_lower_energies_makes_the_energy_fall_with_every_step():
    # one landscape, so that the final energies of different step counts are comparable
    model = tiny_model(ebt_type="default", mcmc_step_size=300.0)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))

    def finals(accept, noise=0.0):
        def final(steps):
            torch.manual_seed(0)  # with noise, the k-step run is the first k steps of the longer ones
            thinking = ThinkingConfig(steps=steps, accept_lower_energies=accept, langevin_noise=noise)
            return model(ids, thinking=thinking, output_final_energies=True).final_energies
        return torch.stack([final(steps) for steps in range(1, 7)])
    plain, accepted = finals(False), finals(True)
    assert (plain[1:] > plain[:-1] + 1e-4).any()  # the plain descent's energy rises somewhere with more steps
    assert (accepted[1:] <= accepted[:-1] + 1e-5).all()
    assert (accepted[-1] <= plain[0] + 1e-5).all()
    noisy = finals(True, noise=1.0)  # noisy proposals too: a step is kept only below the current state's energy
    assert (noisy[1:] <= noisy[:-1] + 1e-5).all() and (noisy[1:] < noisy[:-1] - 1e-4).any()


def test_accepting_lower_energies_is_for_inference_and_generates_as_without_a_cache(tokenizer):
    model = tiny_model(ebt_type="time_embed", denoising_initial_condition="zeros", mcmc_step_size=300.0)
    inputs = tokenizer(["To be, or not"], return_tensors="pt")
    cached = greedy(model, **inputs, accept_lower_energies=True, mcmc_num_steps=3)
    assert torch.equal(cached, greedy(model, **inputs, accept_lower_energies=True, mcmc_num_steps=3, recompute=True))
    model.train()
    with pytest.raises(ValueError, match="accept_lower_energies is for inference"):
        model(inputs["input_ids"], labels=inputs["input_ids"], thinking=ThinkingConfig(accept_lower_energies=True))
    with pytest.raises(ValueError, match="accept_lower_energies and energy_tolerance cannot be combined"):
        ThinkingConfig(accept_lower_energies=True, energy_tolerance=1e-3)


def test_damped_extra_steps_average_their_updates_and_leave_the_trained_steps_alone():
    # one landscape, 2 trained steps: the independent computation repeats single steps from each state
    model = tiny_model(ebt_type="default", mcmc_num_steps=2, mcmc_step_size=30.0)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(4))
    start = torch.randn(2, 7, 257, generator=torch.Generator().manual_seed(5))

    def step(z):
        return model(ids, initial_logits=z, thinking=ThinkingConfig(steps=1)).logits

    with torch.no_grad():
        damped = model(ids, initial_logits=start, output_step_logits=True,
                       thinking=ThinkingConfig(steps=5, damp_extra_steps=True)).step_logits
        plain = model(ids, initial_logits=start, output_step_logits=True, thinking=ThinkingConfig(steps=5)).step_logits
        expected = [step(start)]
        expected.append(step(expected[-1]))
        for j in range(3):  # z <- z + (T(z) - z) / (j + 2)
            z = expected[-1]
            expected.append(z + (step(z) - z) / (j + 2))
    torch.testing.assert_close(damped, torch.stack(expected), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(damped[:2], plain[:2], rtol=0, atol=0)
    assert (damped[2:] - plain[2:]).abs().max() > 1e-2  # the knob does change the extra steps


def test_damped_extra_steps_generate_as_without_a_cache_and_change_nothing_at_the_trained_steps(tokenizer):
    model = tiny_model(ebt_type="time_embed", denoising_initial_condition="zeros", mcmc_step_size=300.0)
    inputs = tokenizer(["To be, or not"], return_tensors="pt")
    steps = model.config.evaluation_steps
    cached = greedy(model, **inputs, damp_extra_steps=True, mcmc_num_steps=steps + 3)
    assert torch.equal(cached, greedy(model, **inputs, damp_extra_steps=True, mcmc_num_steps=steps + 3,
                                      recompute=True))
    assert torch.equal(greedy(model, **inputs, damp_extra_steps=True), greedy(model, **inputs))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mcmc_num_steps=0), "steps=0 is invalid: expected an integer >= 1"),
    (dict(num_candidates=0), "num_candidates=0 is invalid"),
    (dict(energy_tolerance=-1.0), "energy_tolerance=-1.0 is invalid: expected a number >= 0"),
    (dict(mcmc_step_size=-0.5), "step_size=-0.5 is invalid: expected a number > 0"),
    (dict(num_beams=2), "does not support beam search"),
])
def test_bad_generation_options_are_rejected(kwargs, message, tokenizer):
    with pytest.raises(ValueError) as error:
        tiny_model().generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=2, **kwargs)
    assert message in str(error.value)


def test_empty_and_too_long_prompts_are_rejected():
    model = tiny_model()
    with pytest.raises(ValueError, match="non-empty prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="longer than the model's max_position_embeddings=64"):
        model.generate(torch.zeros(1, 70, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):  # the prompt fits, the generation not
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10, min_new_tokens=10)


def test_generate_under_no_grad_and_inference_mode(tokenizer):
    model = tiny_model(denoising_initial_condition="zeros")
    inputs = tokenizer("Brevity is the soul of wit", return_tensors="pt")
    expected = greedy(model, **inputs)
    with torch.no_grad():
        assert torch.equal(greedy(model, **inputs), expected)
    with torch.inference_mode():
        assert torch.equal(greedy(model, **inputs), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_generated_token_observes_in_its_first_descent_step(variant, tokenizer, monkeypatch):
    """The folded step (observe_and_energy) gives the logits and energies of observing first, then descending, and
    runs each layer once less per generated token: M steps in L landscapes cost M forward passes, not M + L.
    In float64, so that the two orders of summation agree to round-off (each descent step amplifies it)."""
    model = tiny_model(ebt_type=variant).double()
    prompt = tokenizer("Now is the winter of our", return_tensors="pt")["input_ids"]
    steps, calls = 3, []
    thinking = ThinkingConfig(steps=steps)
    model.model.layers[0].mlp.register_forward_hook(lambda *args: calls.append(1))

    folds = type(model)._folds

    @torch.no_grad()  # as in generate
    def decode_step(fold):
        monkeypatch.setattr(type(model), "_folds", lambda self, *args: fold and folds(self, *args))
        cache = model.new_cache()
        model(prompt, cache=cache, use_cache=True, logits_to_keep=1, thinking=thinking)
        calls.clear()
        out = model(torch.tensor([[101]]), cache=cache, use_cache=True, thinking=thinking, output_final_energies=True)
        return out, len(calls), cache

    folded, folded_calls, folded_cache = decode_step(True)
    plain, plain_calls, plain_cache = decode_step(False)
    torch.testing.assert_close(folded.logits, plain.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(folded.energies, plain.energies, rtol=1e-10, atol=1e-10)
    landscapes = model.config.num_landscapes
    assert plain_calls == landscapes + steps + 1  # observe each landscape, the steps, the final energy
    assert folded_calls == steps + 1
    for a, b in zip(folded_cache.layers, plain_cache.layers):  # the same cache, holding no autograd graph
        assert a.keys.grad_fn is None and a.values.grad_fn is None
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-12, atol=1e-12)
