"""Sliding-window attention: equality with full attention when the window covers the sequence, an independent
truncated-context computation for small windows, and the O(window) rolling cache in generation."""

import pytest
import torch

from modeling_ebt import EBTForCausalLM

from .conftest import tiny_config, tiny_model

VARIANTS = ["default", "time_embed"]


def ids_of(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_window_covering_the_sequence_equals_full_attention(variant):
    full = tiny_model(ebt_type=variant, denoising_initial_condition="zeros")
    windowed = EBTForCausalLM(tiny_config(ebt_type=variant, sliding_window=20, denoising_initial_condition="zeros"))
    windowed.load_state_dict(full.state_dict())
    windowed.eval()
    ids, initial = ids_of((2, 20)), torch.randn(2, 20, 257)
    a, b = full(ids, initial_logits=initial), windowed(ids, initial_logits=initial)
    assert torch.equal(a.energies, b.energies) and torch.equal(a.logits, b.logits)
    prompt = ids[:, :6]
    assert torch.equal(full.generate(prompt, max_new_tokens=10, do_sample=False),
                       windowed.generate(prompt, max_new_tokens=10, do_sample=False))


def test_small_window_matches_an_independent_truncated_context_computation():
    # with one layer, a candidate under window W sees exactly the last W observed tokens: its energy equals the
    # full-attention energy of the same weights on that truncated context (RoPE is relative, so the shift of
    # positions does not matter)
    window = 4
    full = tiny_model(ebt_type="default", num_hidden_layers=1)
    windowed = EBTForCausalLM(tiny_config(ebt_type="default", num_hidden_layers=1, sliding_window=window)).eval()
    windowed.load_state_dict(full.state_dict())
    ids, probs = ids_of((1, 12)), torch.softmax(torch.randn(1, 12, 257), -1)
    energies = windowed.model(ids, candidate_probs=probs).energies
    for i in range(12):
        start = max(0, i - window + 1)
        alone = full.model(ids[:, start:i + 1], candidate_probs=probs[:, start:i + 1]).energies[:, -1]
        torch.testing.assert_close(energies[:, i], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(energies, full.model(ids, candidate_probs=probs).energies)


def test_sink_tokens_match_an_independent_computation_on_the_sinks_plus_the_window():
    # with sinks, the candidate after token i sees tokens 0..sinks−1 and the last W observed tokens: one layer of full
    # attention over exactly those tokens, at their own positions, gives the same energy
    window, sinks, length = 4, 2, 14
    full = tiny_model(ebt_type="default", num_hidden_layers=1)
    windowed = EBTForCausalLM(tiny_config(ebt_type="default", num_hidden_layers=1, sliding_window=window,
                                          num_sink_tokens=sinks)).eval()
    windowed.load_state_dict(full.state_dict())
    ids, probs = ids_of((1, length)), torch.softmax(torch.randn(1, length, 257), -1)
    energies = windowed.model(ids, candidate_probs=probs).energies
    for i in range(length):
        seen = sorted(set(range(min(sinks, i + 1))) | set(range(max(0, i - window + 1), i + 1)))
        alone = full.model(ids[:, seen], candidate_probs=probs[:, seen],
                           position_ids=torch.tensor([seen])).energies[:, -1]
        torch.testing.assert_close(energies[:, i], alone, rtol=1e-5, atol=1e-5)
    no_sinks = EBTForCausalLM(tiny_config(ebt_type="default", num_hidden_layers=1, sliding_window=window)).eval()
    no_sinks.load_state_dict(full.state_dict())
    differs = (energies - no_sinks.model(ids, candidate_probs=probs).energies).abs() > 1e-6
    assert not differs[0, :window].any() and differs[0, window:].all()  # once token 0 has left the window


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_heads, sinks", [(4, 0), (1, 0), (4, 2)], ids=["mha", "mqa", "mha-sinks"])
def test_rolling_cache_generates_the_tokens_of_recompute_with_the_same_window(variant, kv_heads, sinks):
    model = tiny_model(ebt_type=variant, sliding_window=5, num_key_value_heads=kv_heads, num_sink_tokens=sinks,
                       denoising_initial_condition="zeros")
    prompt = ids_of((2, 7), seed=1)
    mask = torch.ones_like(prompt)
    cache = model.new_cache()
    cached = model.generate(prompt, attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False,
                            cache=cache)
    recomputed = model.generate(prompt, attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False,
                                recompute=True)
    assert torch.equal(cached, recomputed)
    prefix = 1 if variant == "time_embed" else 0
    for layer in cache.layers:  # O(window) memory: the landscape and sink tokens plus the last window − 1 tokens
        assert layer.keys.shape == (2, kv_heads, prefix + sinks + 4, 8)
    assert cache.get_seq_length(0) == prefix + 7 + 13


@pytest.mark.parametrize("variant", VARIANTS)
def test_long_windowed_training_uses_blocks_of_keys_and_equals_the_dense_computation(variant, monkeypatch):
    from modeling_ebt import ThinkingConfig
    from modeling_ebt import modeling_ebt as module

    window, sinks, length = 6, 2, 48
    model = tiny_model(ebt_type=variant, sliding_window=window, num_sink_tokens=sinks).train()
    ids, initial = ids_of((2, length), seed=2), torch.randn(2, length, 257)
    dense = model(ids, labels=ids, initial_logits=initial, thinking=ThinkingConfig(recompute=True))
    key_lengths = []
    original = module.eager_attention

    def recording(attention_module, q, k, v, mask, **kwargs):
        key_lengths.append(k.shape[2])
        return original(attention_module, q, k, v, mask, **kwargs)

    monkeypatch.setattr(module, "eager_attention", recording)
    blocked = model(ids, labels=ids, initial_logits=initial)
    blocked.loss.backward()  # second-order gradients through the blocked attention
    # a block of `window` queries sees at most 2·window − 1 keys, plus the landscape and sink tokens
    assert max(key_lengths) <= 2 * window - 1 + (variant == "time_embed") + sinks
    torch.testing.assert_close(blocked.energies[0], dense.energies[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocked.loss, dense.loss, rtol=1e-4, atol=1e-4)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_through_the_rolling_cache_gives_the_same_tokens(variant):
    # `prefill_chunk_size` (a stock generation option) keeps the prompt's prefill in O(window) memory too
    model = tiny_model(ebt_type=variant, sliding_window=8, num_sink_tokens=3, denoising_initial_condition="zeros")
    prompt = ids_of((2, 50), seed=3)
    whole = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    chunked = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                             prefill_chunk_size=8)
    assert torch.equal(whole, chunked)
