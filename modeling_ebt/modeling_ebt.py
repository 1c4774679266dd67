"""Energy-Based Transformer (Gladstone et al. 2025) as a `transformers` model.

An EBT scores (context, candidate next-token distribution) pairs with a scalar energy and predicts by gradient
descent on that energy. One transformer runs two streams with shared weights:

- the observed stream: ordinary causal self-attention over the real tokens (for `time_embed`, behind a learned
  "landscape" token at position 0). It never looks at candidates, so it is computed once per landscape and, in
  generation, kept in a KV cache;
- the candidate stream: candidate i (a distribution over the vocabulary, embedded linearly) sits at the position
  after observed token i, and attends to the observed keys up to token i plus its own key. A scalar head on the
  candidate stream gives its energy.

The file reads in the order the data flows: norm, rotary embedding, MLP, attention functions, attention, layer,
base model (energy function), causal LM (energy descent, loss, generation).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

from .configuration_ebt import EBTConfig


def softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """Norms and softmax run in at least float32 (half precisions are promoted, float64 is kept)."""
    return torch.promote_types(x.dtype, torch.float32)


class EBTRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # in at least float32, as the reference (float64 stays float64)
        normed = F.rms_norm(hidden.to(softmax_dtype(hidden)), hidden.shape[-1:], eps=self.eps)
        return normed.type_as(hidden) * self.weight


class EBTRotaryEmbedding(nn.Module):
    """RoPE in the split-halves convention (the converter permutes the reference's interleaved wq/wk rows)."""

    def __init__(self, config: EBTConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.inverse_frequencies(config), persistent=False)

    @staticmethod
    def inverse_frequencies(config: EBTConfig) -> torch.Tensor:
        dim = config.head_dim
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(hidden.device)  # batch × seq × dim/2
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(hidden.dtype), emb.sin().to(hidden.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: batch × heads × seq × head_dim; cos, sin: batch × seq × head_dim."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class EBTMLP(nn.Module):
    def __init__(self, config: EBTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(hidden)) * self.up_proj(hidden))


# Attention functions share one signature. `mask` is boolean (True = may attend), broadcastable to
# batch × 1 × queries × keys, or None when every key is visible. With `self_kv`, every query also attends to its
# own key/value (the candidate stream): one softmax over the masked context scores and the self score.


def eager_attention(q, k, v, mask, scaling, self_kv=None):
    batch, heads, queries, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads  # query heads per key/value head (GQA): folded into the query axis, so the
    grouped = (batch, kv_heads, groups * queries, dim)  # cached keys and values are never copied per query head
    q = (q * scaling).reshape(grouped)  # scale the small queries rather than the queries × keys scores
    scores = torch.matmul(q, k.transpose(-1, -2))
    if mask is not None:  # in place: the matmul's backward does not need its output
        scores = scores.masked_fill_(~mask.repeat(1, 1, groups, 1), float("-inf"))
    if self_kv is None:
        out = torch.matmul(F.softmax(scores, dim=-1, dtype=softmax_dtype(q)).to(q.dtype), v)
        return out.view(batch, heads, queries, dim)
    k_self, v_self = (t.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(grouped) for t in self_kv)
    self_scores = (q * k_self).sum(-1, keepdim=True)
    probs = F.softmax(torch.cat((scores, self_scores), dim=-1), dim=-1, dtype=softmax_dtype(q)).to(q.dtype)
    out = torch.matmul(probs[..., :-1], v) + probs[..., -1:] * v_self
    return out.view(batch, heads, queries, dim)


def sdpa_attention(q, k, v, mask, scaling, self_kv=None):
    if self_kv is not None:
        # a fused kernel needs each query's own key appended to a copy of all the context keys; the decomposed form
        # avoids that copy and measured 2.9× faster for a generation step (batch 8, 1024 cached tokens)
        return eager_attention(q, k, v, mask, scaling, self_kv)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


ATTENTION_FUNCTIONS: dict[str, Callable] = {"eager": eager_attention, "sdpa": sdpa_attention}


class EBTAttention(nn.Module):
    def __init__(self, config: EBTConfig):
        super().__init__()
        self.head_dim = config.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def _heads(self, proj: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        return proj(hidden).view(*hidden.shape[:-1], -1, self.head_dim).transpose(1, 2)

    def key_values(self, hidden, cos, sin, cache=None, cache_slot=None):
        """Rotated keys and values of `hidden`, appended to the cache slot when a cache is given."""
        k, v = apply_rotary(self._heads(self.k_proj, hidden), cos, sin), self._heads(self.v_proj, hidden)
        return cache.update(k, v, cache_slot) if cache is not None else (k, v)

    def forward(self, hidden, cos, sin, attend, context_kv=None, cache=None, cache_slot=None):
        """Observed stream (`context_kv` None): attend to the keys of this sequence (and the cache).
        Candidate stream: attend to the observed `context_kv` plus each query's own key.
        `attend(q, k, v, self_kv=None)` applies the stream's mask (see `EBTModel.attention`)."""
        q = apply_rotary(self._heads(self.q_proj, hidden), cos, sin)
        if context_kv is None:
            k, v = self.key_values(hidden, cos, sin, cache, cache_slot)
            out = attend(q, k, v)
            kv = (k, v)
        else:
            out = attend(q, *context_kv, self_kv=self.key_values(hidden, cos, sin))
            kv = None
        out = out.transpose(1, 2).reshape(*hidden.shape[:-1], -1)
        return self.o_proj(out), kv


class EBTDecoderLayer(nn.Module):
    def __init__(self, config: EBTConfig):
        super().__init__()
        self.input_layernorm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EBTAttention(config)
        self.post_attention_layernorm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = EBTMLP(config)

    def forward(self, hidden, cos, sin, attend, context_kv=None, cache=None, cache_slot=None):
        attn_out, kv = self.self_attn(self.input_layernorm(hidden), cos, sin, attend, context_kv, cache, cache_slot)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, kv


class EBTPreTrainedModel(PreTrainedModel):
    config: EBTConfig
    config_class = EBTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EBTDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a damaged weights file is named in the error (safetensors' own error
        names no file). safetensors is not imported here: the remote code needs only torch and transformers."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            folder = Path(str(pretrained_model_name_or_path))
            files = sorted(str(p) for p in folder.glob("*.safetensors")) if folder.is_dir() else []
            where = files[0] if len(files) == 1 else f"one of {files or 'the weights files'}"
            raise OSError(f"{where} is damaged (truncated, empty or not a safetensors file: {error}); save the "
                          "model again or download it again") from error

    @torch.no_grad()
    def _init_weights(self, module):
        """The reference's initialisation: Xavier-normal linears, N(0, 1) embeddings, unit norms, α = init."""
        if isinstance(module, nn.Linear):
            init.xavier_normal_(module.weight, gain=self.config.initializer_gain)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, EBTRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, EBTRotaryEmbedding):
            init.copy_(module.inv_freq, module.inverse_frequencies(self.config))
        elif isinstance(module, EBTForCausalLM):
            init.constant_(module.alpha, self.config.mcmc_step_size)


class SinkSlidingWindowLayer(DynamicLayer):
    """A rolling cache layer of O(window) memory that also keeps the first `num_sink_tokens` keys (the always-visible
    ones: the landscape token of `time_embed` and the configured sink tokens). Returns the kept keys plus the new
    ones."""

    is_sliding = True

    def __init__(self, sliding_window: int, num_sink_tokens: int):
        super().__init__()
        self.sliding_window, self.num_sink_tokens, self.cumulative_length = sliding_window, num_sink_tokens, 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys, values = torch.cat((self.keys, key_states), -2), torch.cat((self.values, value_states), -2)
        self.keys, self.values = keys, values
        recent = self.sliding_window - 1  # the next token's window: itself plus the last window − 1 tokens
        if keys.shape[-2] > self.num_sink_tokens + recent:
            self.keys, self.values = (torch.cat((t[..., : self.num_sink_tokens, :], t[..., t.shape[-2] - recent:, :]),
                                                -2) for t in (keys, values))
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length


@dataclass
class ObservedContext:
    """What candidates need from the observed stream of one energy landscape.

    kv: per layer, the rotated keys and values of the visible observed tokens (cache included);
    key_index: the sequence index of each of those keys (a rolling cache drops old ones);
    key_valid: batch × sequence, False for padding (None: all valid);
    index: key index of each new observed token (the candidate after token i attends to keys ≤ index[i]);
    position: batch × new tokens, RoPE positions of the new observed tokens.
    """

    kv: list
    key_index: torch.Tensor
    key_valid: torch.Tensor | None
    index: torch.Tensor
    position: torch.Tensor


@dataclass
class EBTModelOutput(ModelOutput):
    """energies: batch × positions, the energy of each candidate; cache: the observed stream's KV cache."""

    energies: torch.Tensor | None = None
    cache: Cache | None = None


class EBTModel(EBTPreTrainedModel):
    """The energy function E(context, candidate distribution) of the method page."""

    def __init__(self, config: EBTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if not config.vocab_to_embed_uses_prob_dist:
            self.vocab_to_embed = nn.Linear(config.vocab_size, config.hidden_size, bias=False)
        if config.ebt_type == "time_embed":
            self.time_embeddings = nn.Embedding(config.mcmc_num_steps, config.hidden_size)
        self.layers = nn.ModuleList(EBTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.energy_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.rotary_emb = EBTRotaryEmbedding(config)
        self.gradient_checkpointing = False  # set by EBTForCausalLM.activation_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the observed sequence: the landscape token of `time_embed`."""
        return 1 if self.config.ebt_type == "time_embed" else 0

    @property
    def num_always_visible(self) -> int:
        """Leading keys that every token sees under a sliding window: the landscape token and the sink tokens."""
        return self.num_prefix_tokens + self.config.num_sink_tokens

    def attention_function(self, create_graph: bool) -> Callable:
        """Second-order gradients (training) need explicit softmax attention: fused kernels have no double
        backward. Otherwise the configured implementation."""
        if create_graph:
            return eager_attention
        return ATTENTION_FUNCTIONS.get(self.config._attn_implementation or "eager", eager_attention)

    def new_cache(self) -> Cache:
        """One cache slot per (landscape, layer): landscape k, layer l → slot k·L + l."""
        slots = self.config.num_landscapes * self.config.num_hidden_layers
        window = self.config.sliding_window
        if window is None:
            return Cache(layers=[DynamicLayer() for _ in range(slots)])
        return Cache(layers=[SinkSlidingWindowLayer(window, self.num_always_visible) for _ in range(slots)])

    def _key_index(self, past, new, cache, device):
        """Sequence indices of the keys attention sees after appending `new` tokens to `past` cached ones."""
        total = past + new
        window, sinks = self.config.sliding_window, self.num_always_visible
        kept = past if cache is None or window is None else min(past, sinks + window - 1)
        if kept == past:
            return torch.arange(total, device=device)
        return torch.cat((torch.arange(sinks, device=device), torch.arange(total - (kept - sinks) - new, total,
                                                                             device=device)))

    def _prefix_valid(self, attention_mask):
        """The attention mask extended over the landscape token (never padding)."""
        if attention_mask is None or not self.num_prefix_tokens:
            return attention_mask
        return torch.cat((attention_mask.new_ones(attention_mask.shape[0], self.num_prefix_tokens), attention_mask), 1)

    def _visible(self, query_index, keys, key_valid):
        """Boolean batch × 1 × queries × keys: causal, inside the sliding window (the landscape and sink tokens
        always visible), not padding. `keys` are the keys' sequence indices."""
        visible = keys[None, :] <= query_index[:, None]
        if self.config.sliding_window is not None:
            in_window = query_index[:, None] - keys[None, :] < self.config.sliding_window
            visible &= in_window | (keys[None, :] < self.num_always_visible)
        visible = visible[None, None]
        if key_valid is not None:
            visible = visible & key_valid[:, keys][:, None, None, :].bool()
        return visible

    def attention(self, create_graph, query_index, keys, key_valid, see_self=False) -> Callable:
        """`attend(q, k, v, self_kv=None)` for queries at sequence indices `query_index` over keys at indices `keys`
        (`see_self`: a query may attend to its own key, so padding rows are never empty). With a sliding window and
        many queries, queries go in blocks that each gather only the keys of their windows: no S×S scores."""
        attention_fn = self.attention_function(create_graph)
        scaling, window = self.config.head_dim**-0.5, self.config.sliding_window

        def mask_for(queries, key_positions):
            mask = self._visible(queries, key_positions, key_valid)
            return mask | (key_positions == queries[:, None]) if see_self else mask

        if window is None or len(query_index) <= 2 * window:
            mask = mask_for(query_index, keys)
            if bool(mask.all()):  # e.g. one new token over a cache without padding: no masking needed
                mask = None
            return lambda q, k, v, self_kv=None: attention_fn(q, k, v, mask, scaling, self_kv)

        def attend_in_blocks(q, k, v, self_kv=None):
            out = []
            for start in range(0, len(query_index), window):
                rows = slice(start, start + window)
                queries = query_index[rows]
                near = (keys > queries.min() - window) & (keys <= queries.max()) | (keys < self.num_always_visible)
                cols = near.nonzero().squeeze(1)
                block_self = tuple(t[:, :, rows] for t in self_kv) if self_kv is not None else None
                out.append(attention_fn(q[:, :, rows], k[:, :, cols], v[:, :, cols], mask_for(queries, keys[cols]),
                                        scaling, block_self))
            return torch.cat(out, dim=2)
        return attend_in_blocks

    def observe(self, input_ids, landscape=0, position_ids=None, attention_mask=None, cache=None,
                create_graph=False) -> ObservedContext:
        """Run the observed stream over `input_ids` (appending to `cache`) in energy landscape `landscape`."""
        batch, seq = input_ids.shape
        n_layers, prefix = self.config.num_hidden_layers, self.num_prefix_tokens
        first_slot = landscape * n_layers
        past = cache.get_seq_length(first_slot) if cache is not None and len(cache.layers) > first_slot else 0
        if position_ids is None:
            start = max(past - prefix, 0)
            position_ids = torch.arange(start, start + seq, device=input_ids.device).expand(batch, -1)
        position = position_ids + prefix
        hidden = self.embed_tokens(input_ids)
        if prefix and past == 0:  # the landscape token opens the sequence at position 0
            time = self.time_embeddings.weight[landscape].expand(batch, 1, -1)
            hidden = torch.cat((time, hidden), dim=1)
            position = torch.cat((torch.zeros_like(position[:, :1]), position), dim=1)
        new = hidden.shape[1]
        index = torch.arange(past, past + new, device=input_ids.device)
        key_valid = self._prefix_valid(attention_mask)
        keys = self._key_index(past, new, cache, input_ids.device)
        attend = self.attention(create_graph, index, keys, key_valid, see_self=True)
        cos, sin = self.rotary_emb(hidden, position)
        kv = []
        for i, layer in enumerate(self.layers):
            if i == n_layers - 1:  # candidates only need the last layer's keys and values
                kv.append(layer.self_attn.key_values(layer.input_layernorm(hidden), cos, sin, cache, first_slot + i))
            else:
                run = layer
                if self.gradient_checkpointing and create_graph:  # recompute the layer's activations in backward
                    run = partial(self._gradient_checkpointing_func, layer)
                hidden, layer_kv = run(hidden, cos, sin, attend, cache=cache, cache_slot=first_slot + i)
                kv.append(layer_kv)
        drop = new - seq
        return ObservedContext(kv, keys, key_valid, index[drop:], position[:, drop:])

    def embed_candidates(self, probs: torch.Tensor) -> torch.Tensor:
        if self.config.vocab_to_embed_uses_prob_dist:
            return torch.matmul(probs, self.embed_tokens.weight)
        return self.vocab_to_embed(probs)

    def energy(self, probs, context: ObservedContext, keep, create_graph=False) -> torch.Tensor:
        """Energies (batch × queries) of candidate distributions `probs` (batch × queries × vocab); query q is
        the candidate after new observed token `keep[q]` (an index into the new tokens)."""
        hidden = self.embed_candidates(probs)
        cos, sin = self.rotary_emb(hidden, context.position[:, keep] + 1)
        attend = self.attention(create_graph, context.index[keep], context.key_index, context.key_valid)
        for layer, kv in zip(self.layers, context.kv):
            hidden, _ = layer(hidden, cos, sin, attend, context_kv=kv)
        return self.energy_head(self.norm(hidden)).squeeze(-1)

    def energy_recompute(self, input_ids, probs, landscape=0, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The reference's way, kept as a baseline and test oracle: both streams recomputed together through one
        masked attention over all observed and candidate tokens (batch × seq candidates, one per position)."""
        batch, seq = input_ids.shape
        prefix, device = self.num_prefix_tokens, input_ids.device
        observed = self.embed_tokens(input_ids)
        if prefix:
            observed = torch.cat((self.time_embeddings.weight[landscape].expand(batch, 1, -1), observed), dim=1)
        n_obs = seq + prefix
        hidden = torch.cat((observed, self.embed_candidates(probs)), dim=1)
        if position_ids is None:
            position_ids = torch.arange(seq, device=device).expand(batch, -1)
        parts = [position_ids + prefix, position_ids + prefix + 1]  # observed tokens, then candidates
        if prefix:
            parts.insert(0, torch.zeros_like(position_ids[:, :1]))  # the landscape token
        positions = torch.cat(parts, dim=1)
        obs_index = torch.arange(n_obs, device=device)
        query_index = torch.cat((obs_index, obs_index[prefix:]))  # candidate i sits after observed token i
        mask = self._visible(query_index, obs_index, self._prefix_valid(attention_mask))
        eye = torch.eye(n_obs + seq, dtype=torch.bool, device=device)
        mask = torch.cat((mask.expand(batch, 1, -1, -1), eye[None, None, :, n_obs:].expand(batch, 1, -1, -1)), -1)
        mask = mask | eye[None, None, :, :]
        cos, sin = self.rotary_emb(hidden, positions)
        scaling = self.config.head_dim**-0.5
        for layer in self.layers:
            hidden, _ = layer(hidden, cos, sin, lambda q, k, v: eager_attention(q, k, v, mask, scaling))
        return self.energy_head(self.norm(hidden[:, n_obs:])).squeeze(-1)

    def forward(self, input_ids, candidate_probs, attention_mask=None, position_ids=None, cache=None,
                landscape: int = 0, **kwargs) -> EBTModelOutput:
        """Energies of `candidate_probs` (batch × seq × vocab distributions), candidate i following token i."""
        check_input_ids(input_ids, self.config, past=0)
        if candidate_probs.shape != (*input_ids.shape, self.config.vocab_size):
            raise ValueError(f"candidate_probs must have shape {(*input_ids.shape, self.config.vocab_size)} "
                             f"(batch × seq × vocab_size), got {tuple(candidate_probs.shape)}")
        context = self.observe(input_ids, landscape, position_ids, attention_mask, cache)
        energies = self.energy(candidate_probs, context, torch.arange(input_ids.shape[1], device=input_ids.device))
        return EBTModelOutput(energies=energies, cache=cache)


def check_input_ids(input_ids: torch.Tensor, config: EBTConfig, past: int) -> None:
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(f"input_ids must be a non-empty batch × sequence tensor of token ids, got shape {shape}")
    if input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"input_ids contains token id {bad}, outside the model's vocabulary [0, "
                         f"{config.vocab_size - 1}] (config.vocab_size={config.vocab_size}); is the tokenizer the "
                         f"one this model was trained with?")
    total = past + input_ids.shape[1]
    if total > config.max_position_embeddings:
        raise ValueError(f"sequence of {total} tokens is longer than the model's max_position_embeddings="
                         f"{config.max_position_embeddings}; truncate the input (or the generation length)")


@dataclass
class ThinkingConfig:
    """Per-call knobs of the descent ("System 2 thinking"); None means the model's trained behaviour.

    steps: descent steps (more than in training allowed; `time_embed` repeats its last landscape).
    step_size: override of the learned step size α. langevin_noise: std of the noise added before each step.
    num_candidates: descend from this many initial points and keep, per position, the lowest final energy.
    energy_tolerance: stop descending a position once its energy changes by less than this (adaptive compute).
    recompute: compute both streams over the whole sequence at every step, as the reference does (baseline).
    trace: a list that receives, per forward call, (final energies, steps used) of the kept positions.
    """

    steps: int | None = None
    step_size: float | None = None
    langevin_noise: float | None = None
    num_candidates: int = 1
    energy_tolerance: float | None = None
    recompute: bool = False
    trace: list | None = None

    def __post_init__(self):
        def number(value):
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        checks = [
            ("steps", self.steps is None or (isinstance(self.steps, int) and self.steps >= 1), "an integer >= 1"),
            ("step_size", self.step_size is None or (number(self.step_size) and self.step_size > 0), "a number > 0"),
            ("langevin_noise", self.langevin_noise is None or (number(self.langevin_noise)
                                                               and self.langevin_noise >= 0), "a number >= 0"),
            ("num_candidates", isinstance(self.num_candidates, int) and self.num_candidates >= 1, "an integer >= 1"),
            ("energy_tolerance", self.energy_tolerance is None or (number(self.energy_tolerance)
                                                                   and self.energy_tolerance >= 0), "a number >= 0"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"thinking option {name}={getattr(self, name)!r} is invalid: expected {expected}")

    @property
    def needs_final_energy(self) -> bool:
        return self.num_candidates > 1 or self.trace is not None


@dataclass
class EBTCausalLMOutput(ModelOutput):
    """
    loss: mean cross-entropy over descent steps (only the last with `truncate_mcmc`), plus the contrastive term.
    logits: batch × positions × vocab after the last step; `logits[:, t]` predicts token t + 1.
    energies: steps × batch × positions, the energy at each step before its update.
    step_logits: steps × batch × positions × vocab (with `output_step_logits=True`).
    step_losses: the cross-entropy of each step's logits. final_energies: energy of the final logits (when
    candidates are compared or a trace is asked for). descent_steps: steps used per position.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    energies: torch.Tensor | None = None
    step_logits: torch.Tensor | None = None
    step_losses: torch.Tensor | None = None
    final_energies: torch.Tensor | None = None
    descent_steps: torch.Tensor | None = None
    cache: Cache | None = None


@dataclass
class EBTGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate` output plus, per generated token, the final energy and the descent steps used."""

    energies: torch.Tensor | None = None
    descent_steps: torch.Tensor | None = None


class ReplayBuffer:
    """Final logits of earlier batches, to restart their descent from (System 2 training). It holds sequences of one
    length: a batch of another length replaces what it held."""

    FIELDS = ("input_ids", "labels", "logits")

    def __init__(self, size: int):
        self.size, self.records = size, []

    def add(self, input_ids, labels, logits):
        if self.records and self.records[0][0].shape != input_ids.shape[1:]:
            self.records = []
        for row in zip(input_ids.cpu(), labels.cpu(), logits.detach().cpu()):
            self.records.append(row)
        del self.records[: max(len(self.records) - self.size, 0)]

    def sample(self, count: int, device):
        picks = torch.randperm(len(self.records))[:count].tolist()
        return [torch.stack([self.records[i][j] for i in picks]).to(device) for j in range(3)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The records as three stacked tensors (empty when the buffer is), e.g. for safetensors."""
        if not self.records:
            return {}
        return {name: torch.stack([record[j] for record in self.records]) for j, name in enumerate(self.FIELDS)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.records = list(zip(*(state[name].unbind(0) for name in self.FIELDS))) if state else []


class EBTForCausalLM(EBTPreTrainedModel, GenerationMixin):
    """Energy descent over the candidate logits, the training loss, and `generate`."""

    # the loss is a mean over this batch's tokens: the Trainer must scale it for gradient accumulation and DDP
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = True

    def __init__(self, config: EBTConfig):
        super().__init__(config)
        self.model = EBTModel(config)
        self.alpha = nn.Parameter(torch.tensor(float(config.mcmc_step_size)),
                                  requires_grad=config.mcmc_step_size_learnable)
        self.replay_buffer = ReplayBuffer(config.mcmc_replay_buffer_size) if config.mcmc_replay_buffer else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    # --- the descent ------------------------------------------------------------------------------------------

    def step_schedule(self, thinking: ThinkingConfig) -> list[int]:
        """The energy landscape of each descent step."""
        last = self.config.num_landscapes - 1
        if thinking.steps is not None:
            return [min(k, last) for k in range(thinking.steps)]
        schedule = [min(k, last) for k in range(self.config.mcmc_num_steps)]
        extra = self.config.randomize_mcmc_num_steps
        if extra:
            low = self.config.randomize_mcmc_num_steps_min
            repeats = int(torch.randint(low, extra + 2, ())) if self.training else extra + 1
            schedule = schedule[:-1] + [schedule[-1]] * repeats
        return schedule

    def step_size(self, thinking: ThinkingConfig, shape, device) -> torch.Tensor:
        alpha = self.alpha.clamp(min=1e-4) if thinking.step_size is None else torch.tensor(thinking.step_size)
        alpha = alpha.to(device)
        scale = self.config.randomize_mcmc_step_size_scale
        if self.training and scale > 1 and thinking.step_size is None:
            alpha = alpha * torch.empty(*shape, 1, device=device).uniform_(1 / scale, scale)
        return alpha

    def initial_logits(self, shape, device, dtype) -> torch.Tensor:
        if self.config.denoising_initial_condition == "zeros":
            return torch.zeros(shape, device=device, dtype=dtype)
        return torch.randn(shape, device=device, dtype=dtype) * self.config.gaussian_random_noise_scaling

    def descend(self, energy_fn, logits, schedule, alpha, noise, create_graph, tolerance=None):
        """Gradient descent on the energy, as on the method page:
            p = softmax(z + noise);  E = energy(p);  z = p − α ∂E/∂p
        Returns the logits and the energy of every step, and the steps each position used."""
        truncate, detach = self.config.truncate_mcmc, not (create_graph and self.config.no_mcmc_detach)
        step_logits, step_energies = [], []
        steps_used = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
        active, previous = None, None
        for k, landscape in enumerate(schedule):
            if detach or not logits.requires_grad:
                logits = logits.detach().requires_grad_()
            noisy = logits + noise * torch.randn_like(logits) if noise else logits
            graph = create_graph and (not truncate or k == len(schedule) - 1)
            args = (energy_fn, noisy, landscape, graph, create_graph)
            if graph and self.gradient_checkpointing:  # keep only the step's inputs; rebuild its graph in backward
                probs, energy, grad = self._gradient_checkpointing_func(self.descent_step, *args)
            else:
                probs, energy, grad = self.descent_step(*args)
            if not (torch.isfinite(energy).all() and torch.isfinite(grad).all()):
                raise FloatingPointError(
                    f"non-finite energy or energy gradient at descent step {k} (step size α="
                    f"{float(alpha.detach().mean()):.4g}); the descent diverged: lower mcmc_step_size, check the "
                    f"weights and inputs, or train in float32")
            updated = probs - alpha * grad
            if tolerance is not None:
                if previous is not None:
                    converged = (energy.detach() - previous).abs() < tolerance
                    active = active & ~converged
                    updated = torch.where(active[..., None], updated, logits)
                else:
                    active = torch.ones_like(steps_used, dtype=torch.bool)
                previous = energy.detach()
                steps_used += active
            else:
                steps_used += 1
            logits = updated if create_graph else updated.detach()
            step_logits.append(logits)
            step_energies.append(energy if create_graph else energy.detach())
            if active is not None and not active.any():
                break
        return step_logits, step_energies, steps_used

    def descent_step(self, energy_fn, logits, landscape, create_graph, retain_graph):
        """The candidate distribution of `logits`, its energy, and the energy's gradient with respect to it."""
        probs = F.softmax(logits, dim=-1) if self.config.normalize_initial_condition else logits
        energy = energy_fn(probs, landscape)
        (grad,) = torch.autograd.grad(energy.sum(), probs, create_graph=create_graph, retain_graph=retain_graph)
        return probs, energy, grad

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, every_n_layers=1):
        """`activation_checkpointing_enable()` (or `TrainingArguments(activation_checkpointing=True)`): in training,
        each descent step keeps only its inputs and its graph (candidate forward and input gradient) is rebuilt
        during the backward, and so are the activations of each observed-stream layer: less memory for about one
        more forward pass per step. `every_n_layers` does not apply (the unit is the descent step)."""
        if enable and getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant"):
            raise ValueError("EBT activation checkpointing needs use_reentrant=False: a descent step takes a gradient "
                             "inside the checkpointed region, which the reentrant variant runs without autograd")
        for module in (self, self.model):
            module.gradient_checkpointing = enable
            module._gradient_checkpointing_func = gradient_checkpointing_func

    # --- forward ----------------------------------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, labels=None, initial_logits=None, position_ids=None,
                cache=None, use_cache=None, logits_to_keep: int = 0, output_step_logits: bool = False,
                thinking: ThinkingConfig | None = None, **kwargs) -> EBTCausalLMOutput:
        """Energy descent for the candidates after each token (or the last `logits_to_keep`).

        labels: token ids aligned with input_ids (shifted inside, -100 and padding ignored) → `loss`.
        initial_logits: batch × positions × vocab, the descent's starting point (default: the configured
        initial condition). thinking: per-call descent options (see `ThinkingConfig`).
        """
        if kwargs.get("past_key_values") is not None:
            cache = kwargs["past_key_values"]
        if torch.is_inference_mode_enabled():  # autograd is needed for the descent: leave inference mode
            with torch.inference_mode(False), torch.no_grad():
                args = [t.clone() if isinstance(t, torch.Tensor) else t
                        for t in (input_ids, attention_mask, labels, initial_logits, position_ids)]
                return self.forward(*args, cache=cache, use_cache=use_cache, logits_to_keep=logits_to_keep,
                                    output_step_logits=output_step_logits, thinking=thinking)
        thinking = thinking or ThinkingConfig()
        create_graph = torch.is_grad_enabled()
        if use_cache is None:  # a cache serves generation, not training
            use_cache = self.config.use_cache and labels is None and not self.training
        use_cache = use_cache and not thinking.recompute
        if use_cache and cache is None:
            cache = self.model.new_cache()
        past = 0
        if cache is not None and len(cache.layers):
            past = max(cache.get_seq_length(0) - self.model.num_prefix_tokens, 0)
        check_input_ids(input_ids, self.config, past)
        batch, seq = input_ids.shape
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        replayed = None
        if self.replay_buffer is not None and self.training and labels is not None:
            input_ids, attention_mask, labels, replayed = self._add_replay(input_ids, attention_mask, labels)
            batch = input_ids.shape[0]
        n_keep = seq if not logits_to_keep else min(int(logits_to_keep), seq)
        keep = torch.arange(seq - n_keep, seq, device=input_ids.device)
        n_cand = thinking.num_candidates
        shape = (batch, n_cand * n_keep, self.config.vocab_size)
        if initial_logits is not None:
            if initial_logits.shape != (batch, n_keep, self.config.vocab_size):
                raise ValueError(f"initial_logits must have the shape of the logits, batch × positions × vocab = "
                                 f"{(batch, n_keep, self.config.vocab_size)}, got {tuple(initial_logits.shape)}")
            start = initial_logits.to(self.dtype).repeat(1, n_cand, 1)
        else:
            start = self.initial_logits(shape, input_ids.device, self.dtype)
        if replayed is not None and logits_to_keep == 0:
            start[-replayed.shape[0]:] = replayed
        schedule = self.step_schedule(thinking)
        with torch.enable_grad():
            energy_fn = self._energy_function(input_ids, attention_mask, position_ids, cache, keep, n_cand,
                                              create_graph, thinking.recompute, schedule)
            noise = self.config.langevin_dynamics_noise if thinking.langevin_noise is None else thinking.langevin_noise
            alpha = self.step_size(thinking, shape[:2], input_ids.device)
            step_logits, step_energies, steps_used = self.descend(
                energy_fn, start, schedule, alpha, noise, create_graph, thinking.energy_tolerance)
            final_energies = None
            if thinking.needs_final_energy:
                with torch.no_grad():
                    final = step_logits[-1]
                    probs = F.softmax(final, -1) if self.config.normalize_initial_condition else final
                    final_energies = energy_fn(probs, schedule[-1])
        step_logits, step_energies = torch.stack(step_logits), torch.stack(step_energies)
        if n_cand > 1:  # self-verification: per position, the candidate with the lowest final energy
            step_logits, step_energies, steps_used, final_energies = self._select_candidates(
                n_cand, n_keep, step_logits, step_energies, steps_used, final_energies)
        if thinking.trace is not None:
            thinking.trace.append((final_energies.detach(), steps_used))
        loss, step_losses = None, None
        if labels is not None:
            loss, step_losses = self._loss(step_logits, step_energies, labels, attention_mask, keep, energy_fn)
            if self.replay_buffer is not None and self.training:
                self.replay_buffer.add(input_ids, labels, step_logits[-1])
        return EBTCausalLMOutput(
            loss=loss, logits=step_logits[-1], energies=step_energies,
            step_logits=step_logits if output_step_logits else None, step_losses=step_losses,
            final_energies=final_energies, descent_steps=steps_used, cache=cache if use_cache else None)

    def _energy_function(self, input_ids, attention_mask, position_ids, cache, keep, n_cand, create_graph,
                         recompute, schedule):
        """energy(probs, landscape) for the kept positions, repeated `n_cand` times along the query axis."""
        if recompute:
            def recompute_energy(probs, landscape):
                out = []
                for chunk in probs.chunk(n_cand, dim=1):  # other positions hold the uniform distribution
                    full = probs.new_full((*input_ids.shape, probs.shape[-1]), 1 / probs.shape[-1])
                    full[:, keep] = chunk
                    energies = self.model.energy_recompute(input_ids, full, landscape, attention_mask, position_ids)
                    out.append(energies[:, keep])
                return torch.cat(out, dim=1)
            return recompute_energy
        # every landscape of the schedule (and the last one, for the contrastive term); all of them with a cache
        landscapes = set(schedule) | {self.config.num_landscapes - 1}
        with torch.set_grad_enabled(create_graph):
            contexts = {k: self.model.observe(input_ids, k, position_ids, attention_mask, cache, create_graph)
                        for k in range(self.config.num_landscapes) if k in landscapes or cache is not None}
        queries = keep.repeat(n_cand)

        def energy(probs, landscape):
            return self.model.energy(probs, contexts[landscape], queries, create_graph)
        return energy

    def _select_candidates(self, n_cand, n_keep, step_logits, step_energies, steps_used, final_energies):
        best = final_energies.unflatten(1, (n_cand, n_keep)).argmin(dim=1)  # batch × positions

        def pick(t, lead):  # t: lead dims × batch × (candidates · positions) × rest
            t = t.unflatten(lead + 1, (n_cand, n_keep))
            rest = t.dim() - lead - 3
            index = best.view(*([1] * lead), *best.shape[:1], 1, n_keep, *([1] * rest))
            index = index.expand(*t.shape[:lead + 1], 1, *t.shape[lead + 2:])
            return t.gather(lead + 1, index).squeeze(lead + 1)
        return pick(step_logits, 1), pick(step_energies, 1), pick(steps_used, 0), pick(final_energies, 0)

    def _loss(self, step_logits, step_energies, labels, attention_mask, keep, energy_fn):
        targets = labels.clone()
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask == 0, -100)
        targets = torch.cat((targets[:, 1:], torch.full_like(targets[:, :1], -100)), dim=1)[:, keep]
        step_losses = torch.stack([
            F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            for logits in step_logits])
        if (targets == -100).all():
            raise ValueError("labels has no token to predict: every target is -100 or padding")
        loss = step_losses[-1] if self.config.truncate_mcmc else step_losses.mean()
        if self.config.contrastive_loss_coeff > 0:
            loss = loss + self.config.contrastive_loss_coeff * self._contrastive(step_energies[-1], targets, energy_fn)
        return loss, step_losses.detach()

    def _contrastive(self, predicted_energy, targets, energy_fn):
        """Cross-entropy that ranks the true next token's energy below the final prediction's."""
        valid = targets != -100
        one_hot = F.one_hot(targets.clamp(min=0), self.config.vocab_size).to(predicted_energy.dtype)
        true_energy = energy_fn(one_hot, self.config.num_landscapes - 1)
        scores = -torch.stack((true_energy, predicted_energy), dim=-1)[valid]
        return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))

    def _add_replay(self, input_ids, attention_mask, labels):
        count = min(round(input_ids.shape[0] * self.config.mcmc_replay_buffer_sample_fraction),
                    len(self.replay_buffer.records))
        if count == 0 or self.replay_buffer.records[0][0].shape != input_ids.shape[1:]:
            return input_ids, attention_mask, labels, None
        ids, lab, logits = self.replay_buffer.sample(count, input_ids.device)
        if attention_mask is not None:
            attention_mask = torch.cat((attention_mask, torch.ones_like(ids)), dim=0)
        return torch.cat((input_ids, ids)), attention_mask, torch.cat((labels, lab)), logits

    # --- generation -------------------------------------------------------------------------------------------

    def generate(self, inputs=None, generation_config=None, *, mcmc_num_steps=None, mcmc_step_size=None,
                 langevin_dynamics_noise=None, num_candidates=None, energy_tolerance=None, recompute=None,
                 **kwargs):
        """`transformers` generation with energy descent for every new token.

        Thinking knobs (default: the model's `generation_config`, else the trained behaviour): mcmc_num_steps,
        mcmc_step_size, langevin_dynamics_noise, num_candidates (self-verification), energy_tolerance (adaptive
        early stop); recompute=True generates the reference's way (no cache), as a baseline. With
        `return_dict_in_generate=True` the output carries `energies` and `descent_steps` per generated token.
        """
        config = generation_config or self.generation_config

        def knob(value, name, default=None):
            return value if value is not None else getattr(config, name, default)

        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                inputs = inputs.clone() if isinstance(inputs, torch.Tensor) else inputs
                kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
                return self.generate(inputs, generation_config, mcmc_num_steps=mcmc_num_steps,
                                     mcmc_step_size=mcmc_step_size, langevin_dynamics_noise=langevin_dynamics_noise,
                                     num_candidates=num_candidates, energy_tolerance=energy_tolerance,
                                     recompute=recompute, **kwargs)
        return_dict = kwargs.get("return_dict_in_generate", getattr(config, "return_dict_in_generate", False))
        thinking = ThinkingConfig(
            steps=knob(mcmc_num_steps, "mcmc_num_steps"), step_size=knob(mcmc_step_size, "mcmc_step_size"),
            langevin_noise=knob(langevin_dynamics_noise, "langevin_dynamics_noise"),
            num_candidates=knob(num_candidates, "num_candidates", 1),
            energy_tolerance=knob(energy_tolerance, "energy_tolerance"), recompute=bool(knob(recompute, "recompute")),
            trace=[] if return_dict else None)
        self._check_generation_request(inputs if inputs is not None else kwargs.get("input_ids"), config, kwargs)
        if not thinking.recompute and kwargs.get("cache") is None and kwargs.get("use_cache", True):
            kwargs["cache"] = self.model.new_cache()
        if thinking.recompute:
            kwargs["use_cache"] = False
        output = super().generate(inputs, generation_config, thinking=thinking, **kwargs)
        if not return_dict:
            return output
        energies, steps = zip(*thinking.trace) if thinking.trace else ((), ())
        return EBTGenerateOutput(**{k: v for k, v in output.items()},
                                 energies=torch.cat(energies, dim=1) if energies else None,
                                 descent_steps=torch.cat(steps, dim=1) if steps else None)

    def _check_generation_request(self, input_ids, config, kwargs):
        if isinstance(input_ids, torch.Tensor) and (input_ids.dim() != 2 or input_ids.shape[-1] == 0):
            raise ValueError(f"generate needs a non-empty prompt (batch × tokens), got shape {tuple(input_ids.shape)}")
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1:
            raise ValueError("EBTForCausalLM.generate does not support beam search (num_beams > 1); use greedy or "
                             "sampling decoding, and num_candidates for energy-based self-verification")
        for name in ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha"):
            if kwargs.get(name) is not None or getattr(config, name, None) is not None:
                raise ValueError(f"EBTForCausalLM.generate does not support `{name}`: only greedy and sampling "
                                 f"decoding run energy descent")


# save_pretrained / push_to_hub copy this file (and configuration_ebt.py) next to the weights, with auto_map entries
EBTModel.register_for_auto_class("AutoModel")
EBTForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = ["EBTPreTrainedModel", "EBTModel", "EBTForCausalLM", "ThinkingConfig"]
