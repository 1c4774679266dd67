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
cache, base model (energy function), causal LM (energy descent, loss, generation).
"""

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicLayer
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import ModelOutput

from .configuration_ebt import EBTConfig


def softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """Norms, softmax and the descent state run in at least float32 (half precisions promoted, float64 kept)."""
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

    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (batch × seq × head_dim) for `position_ids`, in the dtype and on the device of `like`."""
        freqs = position_ids[..., None].float() * self.inv_freq.to(like.device)  # batch × seq × dim/2
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


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


# --- attention functions ------------------------------------------------------------------------------------------
# The signature of transformers' attention interface: (module, query, key, value, attention_mask, scaling, ...)
# → (batch × queries × heads × head_dim, weights). `attention_mask` is boolean (True = may attend), broadcastable to
# batch × 1 × queries × keys, or None when every key is visible. The candidate stream passes `self_kv`: every query
# also attends to its own key/value, one softmax over the masked context scores and the self score.


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, self_kv=None, **kwargs):
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads  # query heads per key/value head (GQA): folded into the query axis, so the
    grouped = (batch, kv_heads, groups * queries, dim)  # cached keys and values are never copied per query head
    query = (query * scaling).reshape(grouped)  # scale the small queries rather than the queries × keys scores
    scores = torch.matmul(query, key.transpose(-1, -2))
    if attention_mask is not None:  # in place: the matmul's backward does not need its output
        scores = scores.masked_fill_(~attention_mask.repeat(1, 1, groups, 1), float("-inf"))
    if self_kv is None:
        out = torch.matmul(F.softmax(scores, dim=-1, dtype=softmax_dtype(query)).to(query.dtype), value)
    else:
        k_self, v_self = (t.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(grouped) for t in self_kv)
        self_scores = (query * k_self).sum(-1, keepdim=True)
        probs = F.softmax(torch.cat((scores, self_scores), dim=-1), dim=-1, dtype=softmax_dtype(query))
        probs = probs.to(query.dtype)
        out = torch.matmul(probs[..., :-1], value) + probs[..., -1:] * v_self
    return out.view(batch, heads, queries, dim).transpose(1, 2), None


# Backends of transformers' interface that cannot serve an EBT: flash kernels take no boolean masks with a key per
# query, flex attention and paged attention need their own mask and cache formats.
INAPPLICABLE_ATTENTION = ("flash_attention", "flex_attention", "paged")


def observed_attention_function(config: EBTConfig) -> Callable:
    """The attention function of the observed stream, looked up in transformers' `AttentionInterface` by
    `config._attn_implementation` ("eager", "sdpa", or a function registered with `AttentionInterface.register`).
    Wherever gradients are on, a double backward may follow (training): explicit softmax, as fused kernels have
    none. The candidate stream always uses `eager_attention`: a fused kernel would need each query's own key
    appended to a copy of all context keys (the decomposed form measured 2.9× faster for a generation step)."""
    name = config._attn_implementation or "eager"
    if name == "eager" or torch.is_grad_enabled():
        check_attention_implementation(name)
        return eager_attention
    return AttentionInterface()[check_attention_implementation(name)]


def check_attention_implementation(name: str) -> str:
    if name != "eager" and (name.startswith(INAPPLICABLE_ATTENTION) or name not in AttentionInterface()):
        raise ValueError(f"attn_implementation={name!r} cannot run an EBT: use 'eager' or 'sdpa' (or a function "
                         f"registered with transformers.AttentionInterface.register); flash, flex and paged "
                         f"attention do not take the candidates' own-key masks")
    return name


@dataclass
class WindowBlocks:
    """A sliding-window mask in blocks of queries, each over only the keys of its windows (no queries × keys
    matrix for long sequences): per block, the query rows, the key columns and the block's boolean mask."""

    blocks: list[tuple[slice, torch.Tensor, torch.Tensor]]


def attend(attention_fn, module, query, key, value, mask, self_kv=None) -> torch.Tensor:
    """batch × queries × heads × head_dim: `attention_fn` under `mask` (a tensor, None or `WindowBlocks`)."""
    def run(q, k, v, m, own_kv):
        extra = {} if own_kv is None else {"self_kv": own_kv}  # only the candidate stream's eager function takes it
        return attention_fn(module, q, k, v, m, scaling=module.scaling, dropout=0.0, **extra)[0]

    if not isinstance(mask, WindowBlocks):
        return run(query, key, value, mask, self_kv)
    out = []
    for rows, cols, block_mask in mask.blocks:
        block_self = tuple(t[:, :, rows] for t in self_kv) if self_kv is not None else None
        out.append(run(query[:, :, rows], key[:, :, cols], value[:, :, cols], block_mask, block_self))
    return torch.cat(out, dim=1)


class EBTAttention(nn.Module):
    is_causal = False  # masks are always explicit (None only when every key is visible)

    def __init__(self, config: EBTConfig):
        super().__init__()
        self.config, self.head_dim = config, config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
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

    def forward(self, hidden, cos, sin, attention_mask, context_kv=None, cache=None, cache_slot=None,
                num_observed=None):
        """Observed stream (`context_kv` None): attend to the keys of this sequence (and the cache).
        Candidate stream: attend to the observed `context_kv` plus each query's own key.
        Joint stream (`num_observed` given): both streams in one sequence, as the reference computes them."""
        if num_observed is not None:
            return self.joint_forward(hidden, cos, sin, attention_mask, num_observed, cache, cache_slot)
        q = apply_rotary(self._heads(self.q_proj, hidden), cos, sin)
        if context_kv is None:
            kv = self.key_values(hidden, cos, sin, cache, cache_slot)
            out = attend(observed_attention_function(self.config), self, q, *kv, attention_mask)
        else:
            kv = None
            out = attend(eager_attention, self, q, *context_kv, attention_mask, self.key_values(hidden, cos, sin))
        return self.o_proj(out.reshape(*hidden.shape[:-1], -1)), kv

    def joint_forward(self, hidden, cos, sin, masks, num_observed, cache=None, cache_slot=None):
        """Both streams in one sequence: `hidden` holds the observed tokens then the candidates, projected together;
        the observed tokens attend to their keys (and the cache's) under `masks[0]`, the candidates to the same keys
        under `masks[1]` plus each one's own key. Without a cache this is the reference's computation (the
        `recompute` baseline), where the energy's gradient runs back through the observed stream too; with one, the
        folded first step of generation (`EBTModel.observe_and_energy`), whose cache gets detached keys and values.
        Returns the output and the observed keys and values (cache included)."""
        q = apply_rotary(self._heads(self.q_proj, hidden), cos, sin)
        k, v = self.key_values(hidden, cos, sin)
        observed, candidates = slice(None, num_observed), slice(num_observed, None)
        context = (k[:, :, observed], v[:, :, observed])
        if cache is not None:
            context = cache.update(context[0].detach(), context[1].detach(), cache_slot)
        attention_fn = eager_attention if cache is None else observed_attention_function(self.config)
        out_observed = attend(attention_fn, self, q[:, :, observed], *context, masks[0])
        out_candidates = attend(eager_attention, self, q[:, :, candidates], *context, masks[1],
                                (k[:, :, candidates], v[:, :, candidates]))
        out = torch.cat((out_observed, out_candidates), dim=1).reshape(*hidden.shape[:-1], -1)
        return self.o_proj(out), context


class EBTDecoderLayer(nn.Module):
    def __init__(self, config: EBTConfig):
        super().__init__()
        self.input_layernorm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = EBTAttention(config)
        self.post_attention_layernorm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = EBTMLP(config)

    def forward(self, hidden, cos, sin, attention_mask, context_kv=None, cache=None, cache_slot=None,
                num_observed=None, kv_only=False):
        """(hidden, observed keys and values). `kv_only`: only the keys and values, for the last layer of the
        observed stream (candidates need nothing else from it); through `forward`, so that wrappers such as FSDP
        see the call. `num_observed`: `hidden` holds both streams (`EBTAttention.joint_forward`)."""
        if kv_only:
            return None, self.self_attn.key_values(self.input_layernorm(hidden), cos, sin, cache, cache_slot)
        attn_out, kv = self.self_attn(self.input_layernorm(hidden), cos, sin, attention_mask, context_kv, cache,
                                      cache_slot, num_observed)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, kv


# --- cache --------------------------------------------------------------------------------------------------------


class SinkSlidingWindowLayer(DynamicLayer):
    """A rolling cache layer of O(window) memory that also keeps the first `num_sink_tokens` keys (the always-visible
    ones: the landscape token of `time_embed` and the configured sink tokens). Returns the kept keys plus the new
    ones."""

    is_sliding = True

    def __init__(self, sliding_window: int, num_sink_tokens: int):
        super().__init__()
        self.sliding_window, self.num_sink_tokens, self.cumulative_length = sliding_window, num_sink_tokens, 0

    @property
    def capacity(self) -> int:
        """Keys kept: the sinks plus the next token's window (itself and the last window − 1 tokens)."""
        return self.num_sink_tokens + self.sliding_window - 1

    def kept_index(self, device) -> torch.Tensor:
        """The sequence index of each kept key."""
        seen = self.cumulative_length
        if seen <= self.capacity:
            return torch.arange(seen, device=device)
        recent = self.capacity - self.num_sink_tokens
        return torch.cat((torch.arange(self.num_sink_tokens, device=device),
                          torch.arange(seen - recent, seen, device=device)))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys, values = torch.cat((self.keys, key_states), -2), torch.cat((self.values, value_states), -2)
        self.keys, self.values = keys, values
        if keys.shape[-2] > self.capacity:
            recent = self.capacity - self.num_sink_tokens
            self.keys, self.values = (torch.cat((t[..., : self.num_sink_tokens, :], t[..., t.shape[-2] - recent:, :]),
                                                -2) for t in (keys, values))
        return keys, values

    def get_seq_length(self) -> int:
        return self.cumulative_length


class EBTCache(Cache):
    """The observed stream's KV cache: one slot per (landscape k, layer l), slot k·L + l; rolling layers under a
    sliding window. It knows how many tokens each landscape has seen and the sequence index of each key it
    returns, which is all the masks need."""

    def __init__(self, config: EBTConfig):
        self.num_layers = config.num_hidden_layers
        self.num_prefix_tokens = 1 if config.ebt_type == "time_embed" else 0
        slots = config.num_landscapes * config.num_hidden_layers
        if config.sliding_window is None:
            layers = [DynamicLayer() for _ in range(slots)]
        else:
            sinks = self.num_prefix_tokens + config.num_sink_tokens
            layers = [SinkSlidingWindowLayer(config.sliding_window, sinks) for _ in range(slots)]
        super().__init__(layers=layers)

    def slot(self, landscape: int, layer: int) -> int:
        return landscape * self.num_layers + layer

    def past_length(self, landscape: int = 0) -> int:
        """Tokens landscape `landscape` has seen (its landscape token included)."""
        return self.get_seq_length(self.slot(landscape, 0))

    def observed_length(self) -> int:
        """Observed tokens in the cache (the landscape token not counted)."""
        return max(self.past_length(0) - self.num_prefix_tokens, 0)

    def key_index(self, landscape: int, new: int, device) -> torch.Tensor:
        """Sequence indices of the keys attention sees after `new` tokens are appended to this landscape."""
        layer, past = self.layers[self.slot(landscape, 0)], self.past_length(landscape)
        kept = layer.kept_index(device) if isinstance(layer, SinkSlidingWindowLayer) else torch.arange(past,
                                                                                                      device=device)
        return torch.cat((kept, torch.arange(past, past + new, device=device)))


# --- base model: the energy function ------------------------------------------------------------------------------


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

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """Resizes the token embedding and, with it, the candidates' V×D `vocab_to_embed` (and config.vocab_size):
        kept tokens keep their columns, new ones get the mean column of the old vocabulary."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.base_model.resize_candidate_embedding(embeddings.num_embeddings)
        self.config.vocab_size = embeddings.num_embeddings
        return embeddings


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
class CandidateInputs:
    """Everything the candidate stream needs that does not depend on the candidates, built once per forward:
    per layer the observed keys and values, the candidates' mask, and their rotary cos/sin."""

    kv: list
    mask: torch.Tensor | WindowBlocks | None
    cos: torch.Tensor
    sin: torch.Tensor

    def select_rows(self, rows: slice, kv: list) -> "CandidateInputs":
        """The inputs of rows `rows` of the batch, with `kv` (those rows' keys and values) as the context."""
        def cut(t):
            return t if t is None or t.shape[0] == 1 else t[rows]  # a mask without padding has one row for all
        mask = (WindowBlocks([(queries, cols, cut(block)) for queries, cols, block in self.mask.blocks])
                if isinstance(self.mask, WindowBlocks) else cut(self.mask))
        return CandidateInputs(kv, mask, cut(self.cos), cut(self.sin))


@dataclass
class EBTModelOutput(ModelOutput):
    """energies: batch × positions, the energy of each candidate; cache: the observed stream's KV cache."""

    energies: torch.Tensor | None = None
    cache: Cache | None = None


def default_positions(input_ids: torch.Tensor, past: int) -> torch.Tensor:
    batch, seq = input_ids.shape
    return torch.arange(past, past + seq, device=input_ids.device).expand(batch, -1)


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

    def resize_candidate_embedding(self, vocab_size: int) -> None:
        """`vocab_to_embed` (V×D, weight D×V) to `vocab_size` columns; new columns are the old columns' mean."""
        old = getattr(self, "vocab_to_embed", None)
        if old is None or old.in_features == vocab_size:
            return
        new = nn.Linear(vocab_size, old.out_features, bias=False, device=old.weight.device, dtype=old.weight.dtype)
        kept = min(vocab_size, old.in_features)
        with torch.no_grad():
            new.weight[:, :kept] = old.weight[:, :kept]
            new.weight[:, kept:] = old.weight.mean(dim=1, keepdim=True)
        self.vocab_to_embed = new

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the observed sequence: the landscape token of `time_embed`."""
        return 1 if self.config.ebt_type == "time_embed" else 0

    @property
    def num_always_visible(self) -> int:
        """Leading keys that every token sees under a sliding window: the landscape token and the sink tokens."""
        return self.num_prefix_tokens + self.config.num_sink_tokens

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

    def attention_mask(self, query_index, keys, key_valid, see_self=False) -> torch.Tensor | WindowBlocks | None:
        """The mask of queries at sequence indices `query_index` over keys at indices `keys` (`see_self`: a query
        may attend to its own key, so padding rows are never empty); None when nothing is masked. With a sliding
        window and many queries, `WindowBlocks`. Built once per forward: it depends only on the context."""
        window = self.config.sliding_window

        def mask_for(queries, key_positions):
            mask = self._visible(queries, key_positions, key_valid)
            return mask | (key_positions == queries[:, None]) if see_self else mask

        if window is None or len(query_index) <= 2 * window:
            mask = mask_for(query_index, keys)
            return None if bool(mask.all()) else mask  # e.g. one new token over a cache without padding
        blocks = []
        for start in range(0, len(query_index), window):
            rows = slice(start, start + window)
            queries = query_index[rows]
            near = (keys > queries.min() - window) & (keys <= queries.max()) | (keys < self.num_always_visible)
            cols = near.nonzero().squeeze(1)
            blocks.append((rows, cols, mask_for(queries, keys[cols])))
        return WindowBlocks(blocks)

    def _layer(self, layer, create_graph):
        if self.gradient_checkpointing and create_graph:  # recompute the layer's activations in backward
            return functools.partial(self._gradient_checkpointing_func, layer)
        return layer

    def _observed_inputs(self, input_ids, landscape, position_ids, attention_mask, cache):
        """The observed stream's input hidden states, mask, rotary cos/sin and context (without keys and values yet)
        for new tokens `input_ids` in landscape `landscape`."""
        batch, seq = input_ids.shape
        past = cache.past_length(landscape) if cache is not None else 0
        if position_ids is None:
            position_ids = default_positions(input_ids, max(past - self.num_prefix_tokens, 0))
        position, hidden = position_ids + self.num_prefix_tokens, self.embed_tokens(input_ids)
        if self.num_prefix_tokens and past == 0:  # the landscape token opens the sequence at position 0
            hidden = torch.cat((self.time_embeddings.weight[landscape].expand(batch, 1, -1), hidden), dim=1)
            position = torch.cat((torch.zeros_like(position[:, :1]), position), dim=1)
        new = hidden.shape[1]
        index = torch.arange(past, past + new, device=input_ids.device)
        keys = cache.key_index(landscape, new, input_ids.device) if cache is not None else index
        key_valid = self._prefix_valid(attention_mask)
        mask = self.attention_mask(index, keys, key_valid, see_self=True)
        cos, sin = self.rotary_emb(hidden, position)
        drop = new - seq
        return hidden, mask, cos, sin, ObservedContext([], keys, key_valid, index[drop:], position[:, drop:])

    def observe(self, input_ids, landscape=0, position_ids=None, attention_mask=None, cache=None,
                create_graph=False) -> ObservedContext:
        """Run the observed stream over `input_ids` (appending to `cache`) in energy landscape `landscape`."""
        hidden, mask, cos, sin, context = self._observed_inputs(input_ids, landscape, position_ids, attention_mask,
                                                                cache)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            slot = cache.slot(landscape, i) if cache is not None else None
            hidden, layer_kv = self._layer(layer, create_graph)(hidden, cos, sin, mask, cache=cache, cache_slot=slot,
                                                                kv_only=i == last)
            context.kv.append(layer_kv)
        return context

    def observe_and_energy(self, input_ids, probs, queries, landscape, position_ids, attention_mask, cache):
        """`observe` (appending to `cache`) and `energy` in one pass over the weights, for the first descent step of
        a generated token in each landscape: per layer the new observed tokens and the candidates go through the
        projections and the MLP together, so that at batch 1 the weights are read once for both. The observed rows
        enter each layer detached: the energy's gradient does not run back through them (it is zero there), and
        the cache holds no graph. Returns the candidates' energies and their inputs for the next steps."""
        hidden, mask, cos, sin, context = self._observed_inputs(input_ids, landscape, position_ids, attention_mask,
                                                                cache)
        candidates = self.candidate_inputs(context, queries)
        n_obs, masks = hidden.shape[1], (mask, candidates.mask)
        joint_cos, joint_sin = torch.cat((cos, candidates.cos), dim=1), torch.cat((sin, candidates.sin), dim=1)
        candidate_hidden = self.embed_candidates(probs)
        for i, layer in enumerate(self.layers):
            joint = torch.cat((hidden.detach(), candidate_hidden), dim=1)
            joint, kv = layer(joint, joint_cos, joint_sin, masks, cache=cache, cache_slot=cache.slot(landscape, i),
                              num_observed=n_obs)
            hidden, candidate_hidden = joint[:, :n_obs], joint[:, n_obs:]
            context.kv.append(kv)
        energy = self.energy_head(self.norm(candidate_hidden)).squeeze(-1).to(probs.dtype)
        return energy, candidates

    def candidate_inputs(self, context: ObservedContext, queries: torch.Tensor) -> CandidateInputs:
        """The candidate stream's inputs for candidates after new observed tokens `queries` (indices into the new
        tokens; repeated for several candidates)."""
        mask = self.attention_mask(context.index[queries], context.key_index, context.key_valid)
        cos, sin = self.rotary_emb(self.embed_tokens.weight, context.position[:, queries] + 1)  # in the weights' dtype
        return CandidateInputs(context.kv, mask, cos, sin)

    def embed_candidates(self, probs: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.config.vocab_to_embed_uses_prob_dist else self.vocab_to_embed.weight
        probs = probs.to(weight.dtype)
        return torch.matmul(probs, weight) if self.config.vocab_to_embed_uses_prob_dist else F.linear(probs, weight)

    def energy(self, probs: torch.Tensor, candidates: CandidateInputs) -> torch.Tensor:
        """Energies (batch × queries, in the dtype of `probs`) of candidate distributions `probs` (batch × queries ×
        vocab). This is the function each descent step calls (and `compile_energy` compiles)."""
        hidden = self.embed_candidates(probs)
        for layer, kv in zip(self.layers, candidates.kv):
            hidden, _ = layer(hidden, candidates.cos, candidates.sin, candidates.mask, context_kv=kv)
        return self.energy_head(self.norm(hidden)).squeeze(-1).to(probs.dtype)

    def energy_recompute(self, input_ids, probs, landscape=0, attention_mask=None, position_ids=None) -> torch.Tensor:
        """The reference's way, kept as a baseline and test oracle: the observed tokens and the candidates (batch ×
        seq, one per position) in one sequence, both streams recomputed by every call and every descent step
        (`EBTAttention.joint_forward`)."""
        batch, seq = input_ids.shape
        prefix, device = self.num_prefix_tokens, input_ids.device
        observed = self.embed_tokens(input_ids)
        if prefix:
            observed = torch.cat((self.time_embeddings.weight[landscape].expand(batch, 1, -1), observed), dim=1)
        n_obs = seq + prefix
        hidden = torch.cat((observed, self.embed_candidates(probs)), dim=1)
        if position_ids is None:
            position_ids = default_positions(input_ids, 0)
        parts = [position_ids + prefix, position_ids + prefix + 1]  # observed tokens, then candidates
        if prefix:
            parts.insert(0, torch.zeros_like(position_ids[:, :1]))  # the landscape token
        cos, sin = self.rotary_emb(hidden, torch.cat(parts, dim=1))
        obs_index, key_valid = torch.arange(n_obs, device=device), self._prefix_valid(attention_mask)
        own_key = obs_index[:, None] == obs_index[None, :]  # padding rows see themselves: no empty softmax
        masks = (self._visible(obs_index, obs_index, key_valid) | own_key,
                 self._visible(obs_index[prefix:], obs_index, key_valid))  # candidate i sits after observed token i
        for layer in self.layers:
            hidden, _ = layer(hidden, cos, sin, masks, num_observed=n_obs)
        return self.energy_head(self.norm(hidden[:, n_obs:])).squeeze(-1).to(probs.dtype)

    def forward(self, input_ids, candidate_probs, attention_mask=None, position_ids=None, cache=None,
                landscape: int = 0, **kwargs) -> EBTModelOutput:
        """Energies of `candidate_probs` (batch × seq × vocab distributions), candidate i following token i."""
        check_inputs(input_ids, self.config, cache.observed_length() if cache is not None else 0, attention_mask)
        if candidate_probs.shape != (*input_ids.shape, self.config.vocab_size):
            raise ValueError(f"candidate_probs must have shape {(*input_ids.shape, self.config.vocab_size)} "
                             f"(batch × seq × vocab_size), got {tuple(candidate_probs.shape)}")
        context = self.observe(input_ids, landscape, position_ids, attention_mask, cache)
        queries = torch.arange(input_ids.shape[1], device=input_ids.device)
        return EBTModelOutput(energies=self.energy(candidate_probs, self.candidate_inputs(context, queries)),
                              cache=cache)


TOKEN_ID_DTYPES = (torch.int64, torch.int32, torch.int16)


def check_inputs(input_ids, config: EBTConfig, past: int = 0, attention_mask=None, labels=None) -> None:
    """Clear errors for malformed inputs; one host sync (the vocabulary range), skipped while compiling."""
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = None if input_ids is None else tuple(input_ids.shape)
        raise ValueError(f"input_ids must be a non-empty batch × sequence tensor of token ids, got shape {shape}")
    if input_ids.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"input_ids must hold integer token ids (torch.long or torch.int32), got dtype "
                         f"{input_ids.dtype}")
    batch, seq = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seq):
        raise ValueError(f"attention_mask must have shape batch × (cached + new tokens) = {(batch, past + seq)} "
                         f"for input_ids of shape {(batch, seq)} after {past} cached tokens, got "
                         f"{tuple(attention_mask.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(labels.shape)}")
    if past + seq > config.max_position_embeddings:
        raise ValueError(f"sequence of {past + seq} tokens is longer than the model's max_position_embeddings="
                         f"{config.max_position_embeddings}; truncate the input (or the generation length)")
    if not torch.compiler.is_compiling() and bool(((input_ids < 0) | (input_ids >= config.vocab_size)).any()):
        bad = input_ids[(input_ids < 0) | (input_ids >= config.vocab_size)][0].item()
        raise ValueError(f"input_ids contains token id {bad}, outside the model's vocabulary [0, "
                         f"{config.vocab_size - 1}] (config.vocab_size={config.vocab_size}); is the tokenizer the "
                         f"one this model was trained with?")


@dataclass
class ThinkingConfig:
    """Per-call knobs of the descent ("System 2 thinking"); None means the model's trained behaviour.

    steps: descent steps (more than in training allowed; `time_embed` repeats its last landscape).
    step_size: override of the learned step size α. langevin_noise: std of the noise added before each step.
    num_candidates: descend from this many initial points and keep, per position, the lowest final energy.
    energy_tolerance: stop descending a position once its energy changes by less than this (adaptive compute).
    accept_lower_energies: keep a step's update, per position, only if it lowers the energy of the current
        prediction (the reference's `infer_accept_lower_energies`): the energy never rises with more steps. Inference
        only; one more energy forward per step.
    damp_extra_steps: the steps beyond the trained count (`config.evaluation_steps`) move by a shrinking fraction of
        their update, z ← z + (z' − z) / (j + 2) at the j-th extra step (j = 0, 1, ...): the extra steps average their
        updates (a Mann iteration) instead of following the landscape the model was not trained to descend that far,
        so thinking longer changes the prediction ever less. The trained steps are unchanged.
    recompute: compute both streams over the whole sequence at every step, as the reference does (baseline).
    """

    steps: int | None = None
    step_size: float | None = None
    langevin_noise: float | None = None
    num_candidates: int = 1
    energy_tolerance: float | None = None
    accept_lower_energies: bool = False
    damp_extra_steps: bool = False
    recompute: bool = False

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
        if self.accept_lower_energies and self.energy_tolerance is not None:
            raise ValueError("thinking options accept_lower_energies and energy_tolerance cannot be combined: choose "
                             "one rule for when a position stops moving")


@dataclass
class EBTCausalLMOutput(ModelOutput):
    """
    loss: mean cross-entropy over descent steps (only the last with `truncate_mcmc`), plus the contrastive and ranking
        terms (with `ranking_loss_coeff`, the cross-entropy of every candidate in training).
    logits: batch × positions × vocab after the last step; `logits[:, t]` predicts token t + 1.
    energies: steps × batch × positions, the energy at each step before its update.
    step_logits: steps × batch × positions × vocab (with `output_step_logits=True`).
    step_losses: the cross-entropy of each step's logits. final_energies: energy of the final logits (when
    candidates are compared or `output_final_energies=True`). descent_steps: steps used per position.
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


@dataclass
class Descent:
    """A finished descent: the state (language: logits; images: pixels) and the energy after every step (steps ×
    the state's shape; steps × its leading axes), the steps each query used, and (when asked) the energy of the
    final state."""

    states: torch.Tensor
    energies: torch.Tensor
    steps_used: torch.Tensor
    final_energies: torch.Tensor | None = None


def leaves_inference_mode(method):
    """The descent needs autograd: under `torch.inference_mode()` run `method` with inference mode off (and
    gradients off), on clones of its tensor arguments (inference tensors cannot be saved for backward)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return method(self, *args, **kwargs)

        def clone(value):
            return value.clone() if isinstance(value, torch.Tensor) else value

        with torch.inference_mode(False), torch.no_grad():
            return method(self, *map(clone, args), **{k: clone(v) for k, v in kwargs.items()})
    return wrapper


def keep_fsdp_weights_gathered(model: nn.Module) -> list[nn.Module]:
    """Make FSDP2 (`fully_shard`, as accelerate's FSDP2 preparation applies it) correct for the descent; returns
    the FSDP units of `model` (none without FSDP: then it does nothing).

    FSDP gathers a unit's weights in its forward and frees them after its forward and after its backward. The
    descent defeats both: it calls every layer again at each step, its `torch.autograd.grad` inside `forward` runs
    FSDP's backward hooks (which would free weights the rest of the forward still uses), and the outer backward
    differentiates those inner gradients through graph nodes that hold the weights with no FSDP hook to gather them
    again. So every unit keeps its weights gathered from its forward to the end of the outer backward (ZeRO-2's
    memory during a step: full weights on each process; gradients are reduce-scattered and optimizer states stay
    sharded), and `reshard_when_backward_ends` hands them back sharded."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []  # FSDP needs a process group: one check, not a walk over the modules at every forward
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:  # every call: a later set_reshard_after_*(True) would make the gradients silently wrong
        unit.set_reshard_after_forward(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
    return units


def reshard_when_backward_ends(units: list[nn.Module], *outputs: torch.Tensor) -> None:
    """Reshard the FSDP `units` once the backward through `outputs` ends, after FSDP's own end-of-backward callback
    (queued at the backward's first step, before these hooks fire) has reduce-scattered the last gradients: the
    optimizer, gradient clipping and the next forward then find the sharded parameters and gradients they find
    without an EBT."""
    queued = False

    def reshard():
        nonlocal queued
        queued = False
        for unit in units:
            unit.reshard()

    def queue_reshard(grad):
        nonlocal queued
        if not queued:
            queued = True
            torch.autograd.Variable._execution_engine.queue_callback(reshard)  # as FSDP queues its own callback

    for output in outputs if units else ():
        if output.requires_grad:
            output.register_hook(queue_reshard)


class RebuiltStep(torch.autograd.Function):
    """Activation checkpointing of one descent step, rebuilt once. The forward computes the step's values (energy
    forward and input gradient) and keeps only the step's inputs; the backward rebuilds the step's second-order graph
    once, over detached copies of its inputs, and differentiates it. (torch's `checkpoint` re-ran the energy forward
    already inside the forward, when the step's own `autograd.grad` unpacked the activations it had dropped.)

    `run(state, context, create_graph, rows)` returns (prediction, energy, ∂E/∂prediction) of `state`, the rows
    `rows` of the batch, with `context` (those rows of the observed stream's keys and values) in place of the tensors
    the energy function holds. The energies of different rows do not depend on each other, so both passes go
    `chunks` (slices of the batch) at a time: the rebuilt graph of one chunk is alive at once. `parameters` are the
    energy's trainable parameters; their gradients are returned to the outer backward, not accumulated here: each
    parameter's gradient is summed over the steps by autograd and reaches `.grad` (and DDP's hooks) once."""

    @staticmethod
    def forward(ctx, run, chunks, num_context, state, *tensors):
        ctx.run, ctx.chunks, ctx.num_context = run, chunks, num_context
        ctx.autocast = [(device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
                        if torch.is_autocast_enabled(device)]  # the rebuild runs under the same mixed precision
        ctx.save_for_backward(state, *tensors)
        outputs = []
        with torch.enable_grad():  # as without checkpointing (create_graph): in one slice, the same float operations
            for rows in chunks:
                chunk = run(state[rows].detach().requires_grad_(), [t[rows].detach() for t in tensors[:num_context]],
                            True, rows)
                outputs.append([output.detach() for output in chunk])
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    @staticmethod
    def backward(ctx, *output_grads):
        state, *tensors = ctx.saved_tensors
        context, parameters = tensors[:ctx.num_context], tensors[ctx.num_context:]
        batched = (state, *context)
        grads = [torch.zeros_like(t) if t.requires_grad else None for t in batched] + [None] * len(parameters)
        for rows in ctx.chunks:
            with torch.enable_grad(), contextlib.ExitStack() as autocast:
                for device, dtype in ctx.autocast:
                    autocast.enter_context(torch.autocast(device, dtype=dtype))
                chunk_state, *chunk_context = (t[rows].detach().requires_grad_(t.requires_grad) for t in batched)
                # the layers get non-leaf views: module hooks (e.g. FlopCounterMode's module tracker) cannot watch
                # leaf tensors inside autograd.grad
                outputs = ctx.run(chunk_state, [t.view_as(t) for t in chunk_context], True, rows)
            used = [(output, grad[rows]) for output, grad in zip(outputs, output_grads) if grad is not None]
            inputs = (chunk_state, *chunk_context, *parameters)
            wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
            found = torch.autograd.grad([o for o, _ in used], [inputs[i] for i in wanted], [g for _, g in used],
                                        allow_unused=True)
            for i, grad in zip(wanted, found):
                if grad is None:
                    continue
                if i < len(batched):
                    grads[i][rows] = grad
                else:
                    grads[i] = grad if grads[i] is None else grads[i] + grad
        return None, None, None, *grads


def hashed_normal(keys: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Standard normal float32 noise of shape keys.shape × size that is a fixed function of (seed, key, index):
    the same for a key whatever batch it is in, on every run and device (Box–Muller over a splitmix64 hash)."""
    counter = (keys[..., None] * size + torch.arange(size, device=keys.device)) * 2 + seed * 2**44
    u1, u2 = _hashed_uniform(counter), _hashed_uniform(counter + 1)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def _signed(constant: int) -> int:
    return constant - 2**64 if constant >= 2**63 else constant


def _hashed_uniform(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser in wrapping int64 arithmetic; its top 24 bits as a uniform in (0, 1)."""
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ ((x >> 30) & (2**34 - 1))) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ ((x >> 27) & (2**37 - 1))) * _signed(0x94D049BB133111EB)
    x = x ^ ((x >> 31) & (2**33 - 1))
    return (((x >> 40) & (2**24 - 1)).float() + 0.5) / 2**24


class AlphaAsVector(ConversionOps):
    """Checkpoints written before α became a 1-element parameter hold it as a 0-d tensor: `from_pretrained` reads
    them as shape (1,). Its own reverse: a saved α is already (1,)."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        (tensors,) = input_dict.values()
        return {target_patterns[0]: tensors[0].reshape(1)}

    @property
    def reverse_op(self) -> ConversionOps:
        return self


def alpha_as_vector_on_load(module, state_dict, prefix, *args) -> None:
    """`load_state_dict` of a state dict with the 0-d α of older checkpoints and of the reference code."""
    key = prefix + "alpha"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


class EnergyDescentMixin:
    """The energy descent ("thinking" loop) that every EBT runs, whatever its modality.

    The state z of the descent is what is being predicted, in the form the model descends on: candidate logits for
    language, the image's pixels for denoising. `prediction(z)` is what the energy function scores (softmax of the
    logits, or the pixels themselves), and each step is

        p = prediction(z + noise);  E = energy(p);  z' = p − α ∂E/∂p

    with the method's options: energy landscapes per step (`time_embed`), random step counts and step sizes in
    training, Langevin noise, truncation, no detaching between steps, activation checkpointing, an energy tolerance
    (adaptive compute) and a finiteness check. One energy scores the last `prediction_dims` axes of the state (the
    vocabulary for language, channels × height × width for images): energies, step counts and random step sizes
    have the state's leading axes. A model using the mixin has `config` (the descent fields of `EBTConfig`),
    `alpha`, `model` (its energy function), `training`, and `gradient_checkpointing`."""

    prediction_dims = 1

    def prediction(self, state: torch.Tensor) -> torch.Tensor:
        """What the energy function scores for state z (the identity unless a model says otherwise)."""
        return state

    def _batch_shape(self, state: torch.Tensor) -> torch.Size:
        """The axes of `state` with one energy each."""
        return state.shape[:state.dim() - self.prediction_dims]

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
        alpha = alpha.to(device, softmax_dtype(self.alpha))
        scale = self.config.randomize_mcmc_step_size_scale
        if self.training and scale > 1 and thinking.step_size is None:
            alpha = alpha * torch.empty(*shape, 1, device=device).uniform_(1 / scale, scale)
        return alpha

    def descend(self, energy_fn, state, schedule, alpha, noise, create_graph, moves=None, damp_after=None) -> Descent:
        """Gradient descent on the energy, as on the method page, for every step of `schedule`:
            p = prediction(z + noise);  E = energy(p);  z = p − α ∂E/∂p
        `moves(state, updated, energy, landscape) -> (moving, done)`, when given, says which queries take the step
        (the others keep their state) and whether the descent may end here. From step `damp_after` on, a step moves
        by 1 / (j + 2) of its update (`ThinkingConfig.damp_extra_steps`)."""
        step_states, step_energies, finite = [], [], []
        steps_used = torch.zeros(self._batch_shape(state), dtype=torch.long, device=state.device)
        for k, landscape in enumerate(schedule):
            updated, energy, ok = self.descent_step(energy_fn, state, landscape, alpha, noise, create_graph,
                                                    self._keeps_graph(k, len(schedule), create_graph))
            if damp_after is not None and k >= damp_after:
                updated = state + (updated - state) / (k - damp_after + 2)
            moving, done = (True, False) if moves is None else moves(state, updated, energy, landscape)
            state = updated if moves is None else torch.where(
                moving.view(*moving.shape, *[1] * self.prediction_dims), updated, state)
            step_states.append(state)
            step_energies.append(energy)
            finite.append(ok)
            steps_used = steps_used + moving
            if done:
                break
        self._check_finite(finite, alpha)
        return Descent(torch.stack(step_states), torch.stack(step_energies), steps_used)

    @staticmethod
    def until_converged(tolerance):
        """Adaptive compute: a query stops for good once its energy changes by less than `tolerance` between two
        steps; the descent ends when all have (one host sync per step, the price of stopping)."""
        last = {}

        def moves(state, updated, energy, landscape):
            energy = energy.detach()
            active = last.get("active", torch.ones(energy.shape, dtype=torch.bool, device=energy.device))
            if "energy" in last:
                active = active & ((energy - last["energy"]).abs() >= tolerance)
            last.update(active=active, energy=energy)
            return active, not bool(active.any())
        return moves

    def accepting_lower_energies(self, energy_fn, noise):
        """A query takes a step only if the update's energy is below that of its current state (the reference's
        `infer_accept_lower_energies`; inference, no graph): the energy of the prediction never rises, whatever the
        number of steps. One more energy forward per step: the update's (the current state's energy is the step's own
        without noise, and is carried from the last step within a landscape with noise)."""
        last = {}

        def moves(state, updated, energy, landscape):
            if not noise:
                current = energy
            elif last.get("landscape") == landscape:
                current = last["energy"]
            else:
                current = self._energy_of(energy_fn, state, landscape)
            proposed = self._energy_of(energy_fn, updated, landscape)
            lower = proposed < current
            last.update(landscape=landscape, energy=torch.where(lower, proposed, current))
            return lower, False
        return moves

    def _energy_of(self, energy_fn, state, landscape) -> torch.Tensor:
        """The energy of state z (of its prediction), without a graph."""
        with torch.no_grad():
            return energy_fn(self.prediction(state), landscape)

    def descent_step(self, energy_fn, state, landscape, alpha, noise, create_graph, keep_graph):
        """One step from state z: p = prediction(z + noise), E = energy(p), z' = p − α ∂E/∂p. Returns z', E and a
        flag tensor (energy finite, update finite), checked after the loop: no host sync per step."""
        state = self._step_input(state, create_graph)
        noisy = state + noise * torch.randn_like(state) if noise else state
        probs, energy, grad = self._energy_and_gradient(energy_fn, noisy, landscape, keep_graph, create_graph)
        updated = probs - alpha * grad
        ok = torch.stack((torch.isfinite(energy).all() & torch.isfinite(grad).all(), torch.isfinite(updated).all()))
        if not create_graph:
            updated, energy = updated.detach(), energy.detach()
        return updated, energy, ok

    def _step_input(self, state, create_graph):
        """Detach policy: each step starts from a detached state unless `no_mcmc_detach` keeps the chain's graph in
        training."""
        if not (create_graph and self.config.no_mcmc_detach) or not state.requires_grad:
            return state.detach().requires_grad_()
        return state

    def _keeps_graph(self, k, num_steps, create_graph) -> bool:
        """Truncation: with `truncate_mcmc` only the last step keeps its second-order graph."""
        return create_graph and (not self.config.truncate_mcmc or k == num_steps - 1)

    def _energy_and_gradient(self, energy_fn, state, landscape, keep_graph, create_graph):
        """Checkpoint dispatch: in training with activation checkpointing, a step keeps only its inputs and its graph
        is rebuilt once in the backward (`RebuiltStep`). An energy function that holds tensors with gradients (the
        language model's observed keys and values) lists them in `energy_fn.context_tensors(landscape)` and takes
        replacements for them as `energy_fn(probs, landscape, context=...)`."""
        if not (keep_graph and self.gradient_checkpointing):
            return self.energy_gradient(energy_fn, state, landscape, keep_graph, create_graph)
        context = list(getattr(energy_fn, "context_tensors", lambda landscape: [])(landscape))
        chunks = [slice(None)]
        if context:  # an energy function that takes `rows` scores slices of the batch
            rows = -(-state.shape[0] // self.config.checkpointing_chunks)
            chunks = [slice(start, start + rows) for start in range(0, state.shape[0], rows)]

        def run(step_state, step_context, rebuild, rows):
            fn = functools.partial(energy_fn, context=step_context, rows=rows) if context else energy_fn
            return self.energy_gradient(fn, step_state, landscape, rebuild, rebuild)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        return RebuiltStep.apply(run, chunks, len(context), state, *context, *parameters)

    def energy_gradient(self, energy_fn, state, landscape, create_graph, retain_graph):
        """The prediction of `state`, its energy, and the energy's gradient with respect to the prediction."""
        probs = self.prediction(state)
        energy = energy_fn(probs, landscape)
        (grad,) = torch.autograd.grad(energy.sum(), probs, create_graph=create_graph, retain_graph=retain_graph)
        return probs, energy, grad

    def _check_finite(self, flags, alpha):
        """One host sync per descent: the first step whose energy, gradient or update p − α∂E/∂p is not finite."""
        flags = torch.stack(flags).cpu()
        if bool(flags.all()):
            return
        k, kind = divmod(int((~flags).flatten().nonzero()[0]), 2)
        step_size = f"{float(alpha.detach().float().mean()):.4g}"
        if kind == 0:
            raise FloatingPointError(
                f"non-finite energy or energy gradient at descent step {k} (step size α={step_size}); the descent "
                f"diverged: lower mcmc_step_size, check the weights and inputs, or train in float32")
        raise FloatingPointError(
            f"non-finite update p − α·∂E/∂p (the step's new state) at descent step {k}: the step size "
            f"α={step_size} overflows; lower mcmc_step_size (the config field, or the per-call step size: generate's "
            f"or denoise's mcmc_step_size, ThinkingConfig.step_size) by orders of magnitude")

    def _set_gradient_checkpointing(self, enable=True, gradient_checkpointing_func=checkpoint, every_n_layers=1):
        """`activation_checkpointing_enable()` (or `TrainingArguments(activation_checkpointing=True)`): in training,
        each descent step keeps only its inputs and its graph (candidate forward and input gradient) is rebuilt once
        during the backward, `config.checkpointing_chunks` slices of the batch at a time (`RebuiltStep`); the
        observed stream's layers go through `gradient_checkpointing_func` (torch's non-reentrant `checkpoint`). Less
        memory for about one more candidate forward and input gradient per step. `every_n_layers` does not apply."""
        if enable and getattr(gradient_checkpointing_func, "keywords", {}).get("use_reentrant"):
            raise ValueError("EBT activation checkpointing needs use_reentrant=False: the observed stream's layers are "
                             "called with keyword arguments, which the reentrant variant does not take")
        for module in (self, self.model):
            module.gradient_checkpointing = enable
            module._gradient_checkpointing_func = gradient_checkpointing_func

    def _run_descent(self, energy_fn, start, schedule, thinking, create_graph) -> Descent:
        """The descent from `start` under the per-call `thinking` options (step size, noise, tolerance)."""
        alpha_shape = (*self._batch_shape(start), *[1] * (self.prediction_dims - 1))  # step_size adds the last 1
        alpha = self.step_size(thinking, alpha_shape, start.device)
        noise = self.config.langevin_dynamics_noise if thinking.langevin_noise is None else thinking.langevin_noise
        moves = None
        if thinking.accept_lower_energies:
            if self.training:
                raise ValueError("thinking option accept_lower_energies is for inference: its accept/reject choice has "
                                 "no gradient; call model.eval() first")
            moves, create_graph = self.accepting_lower_energies(energy_fn, noise), False
        elif thinking.energy_tolerance is not None:
            moves = self.until_converged(thinking.energy_tolerance)
        damp_after = self.config.evaluation_steps if thinking.damp_extra_steps else None
        return self.descend(energy_fn, start, schedule, alpha, noise, create_graph, moves, damp_after)


class EBTForCausalLM(EnergyDescentMixin, EBTPreTrainedModel, GenerationMixin):
    """Energy descent over the candidate logits, the training loss, and `generate`."""

    # the loss is a mean over this batch's tokens: the Trainer must scale it for gradient accumulation and DDP
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = True

    def __init__(self, config: EBTConfig):
        super().__init__(config)
        self.model = EBTModel(config)
        # one element, not a 0-d scalar: FSDP shards only parameters of at least one dimension
        self.alpha = nn.Parameter(torch.full((1,), float(config.mcmc_step_size)),
                                  requires_grad=config.mcmc_step_size_learnable)
        self.register_load_state_dict_pre_hook(alpha_as_vector_on_load)
        self.gradient_checkpointing = False
        self.compiled_energy = None  # set by compile_energy()
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def new_cache(self) -> EBTCache:
        return EBTCache(self.config)

    def compile_energy(self, **torch_compile_kwargs) -> "EBTForCausalLM":
        """Compile the energy function each descent step calls (`torch.compile(**torch_compile_kwargs)`) and
        return the model. The descent's `autograd.grad` stays outside the compiled graph; training (which needs
        the double backward compiled graphs lack) keeps the eager function."""
        self.compiled_energy = torch.compile(self.model.energy, **torch_compile_kwargs)
        return self

    def prediction(self, logits: torch.Tensor) -> torch.Tensor:
        """The candidate distribution softmax(z) (normalize_initial_condition, the paper), else the logits."""
        return F.softmax(logits, dim=-1) if self.config.normalize_initial_condition else logits

    def initial_logits(self, position_ids: torch.Tensor, num_candidates: int = 1) -> torch.Tensor:
        """Starting logits, batch × (candidates · positions) × vocab, for queries at RoPE positions `position_ids`
        (batch × positions). Training draws fresh noise; evaluation and generation draw noise that is a fixed
        function of (position, candidate): a sequence starts the same alone or in any batch, left-padded or not,
        on every run."""
        batch, positions = position_ids.shape
        shape = (batch, num_candidates * positions, self.config.vocab_size)
        dtype = softmax_dtype(self.alpha)
        if self.config.denoising_initial_condition == "zeros":
            return torch.zeros(shape, device=position_ids.device, dtype=dtype)
        if self.training:
            noise = torch.randn(shape, device=position_ids.device, dtype=dtype)
        else:
            candidate = torch.arange(num_candidates, device=position_ids.device).repeat_interleave(positions)
            keys = position_ids.repeat(1, num_candidates).long() + candidate * 2**24
            noise = hashed_normal(keys, self.config.vocab_size).to(dtype)
        return noise * self.config.gaussian_random_noise_scaling

    # --- forward ----------------------------------------------------------------------------------------------

    @leaves_inference_mode
    def forward(self, input_ids=None, attention_mask=None, labels=None, initial_logits=None, position_ids=None,
                cache=None, use_cache=None, logits_to_keep: int = 0, output_step_logits: bool = False,
                output_final_energies: bool = False, thinking: ThinkingConfig | None = None,
                **kwargs) -> EBTCausalLMOutput:
        """Energy descent for the candidates after each token (or the last `logits_to_keep`).

        labels: token ids aligned with input_ids (shifted inside, -100 and padding ignored) → `loss`.
        initial_logits: batch × positions × vocab, the descent's starting point (default: `initial_logits()`).
        thinking: per-call descent options (see `ThinkingConfig`). output_final_energies: also return the energy
        of the final logits (always computed with several candidates).
        """
        fsdp_units = keep_fsdp_weights_gathered(self)
        if kwargs.get("fused_lm_head"):  # TRL's trainers ask for per-token log-probabilities (see `__setattr__`)
            return self.fused_lm_head_forward(input_ids, labels, attention_mask, position_ids, kwargs)
        thinking = thinking or ThinkingConfig()
        ranking = self.training and labels is not None and self.config.ranking_loss_coeff > 0
        if ranking and thinking.num_candidates == 1:
            thinking = replace(thinking, num_candidates=self.config.ranking_num_candidates)
        cache, use_cache = self._cache_for(kwargs.get("past_key_values", cache), use_cache, labels, thinking)
        past = cache.observed_length() if cache is not None else 0
        keep = self._kept_positions(input_ids, attention_mask, labels, logits_to_keep, past)
        if position_ids is None:
            position_ids = default_positions(input_ids, past)
        start = self._start(initial_logits, position_ids[:, keep], thinking.num_candidates)
        schedule, create_graph = self.step_schedule(thinking), torch.is_grad_enabled()
        with torch.enable_grad():
            energy_fn = self._energy_function(input_ids, attention_mask, position_ids, cache, keep, thinking,
                                              schedule, create_graph)
            descent = self._run_descent(energy_fn, start, schedule, thinking, create_graph)
            final_energies = None
            if ranking:  # with a graph to the weights, not to the descent: it trains the verifier
                final_energies = energy_fn(self.prediction(descent.states[-1].detach()), schedule[-1])
                descent.final_energies = final_energies.detach()
            elif thinking.num_candidates > 1 or output_final_energies:
                descent.final_energies = self._final_energies(energy_fn, descent, schedule[-1])
        targets = None if labels is None else self._targets(labels, attention_mask, keep)
        loss = step_losses = None
        if ranking:  # every candidate, before self-verification keeps one per position
            loss, step_losses = self._ranked_loss(descent, final_energies, targets, energy_fn, thinking.num_candidates)
        descent = self._select_candidates(descent, thinking.num_candidates)
        if targets is not None and not ranking:
            loss, step_losses = self._loss(descent, targets, energy_fn, thinking.num_candidates)
        reshard_when_backward_ends(fsdp_units, descent.states, descent.energies)
        return EBTCausalLMOutput(
            loss=loss, logits=descent.states[-1], energies=descent.energies, step_losses=step_losses,
            step_logits=descent.states if output_step_logits else None, final_energies=descent.final_energies,
            descent_steps=descent.steps_used, cache=cache if use_cache else None)

    def _cache_for(self, cache, use_cache, labels, thinking):
        """The cache policy, in one place: a cache serves generation (not training, not `recompute`). An empty
        cache of another class (the `DynamicCache` that `generate` makes by default) becomes an `EBTCache`."""
        if use_cache is None:
            use_cache = self.config.use_cache and labels is None and not self.training
        use_cache = use_cache and not thinking.recompute
        if thinking.recompute or (cache is None and not use_cache):
            return None, use_cache
        if cache is None or (not isinstance(cache, EBTCache) and cache.get_seq_length() == 0):
            return self.new_cache(), use_cache
        if not isinstance(cache, EBTCache):
            raise ValueError(f"cache must be an EBTCache (model.new_cache()), with one slot per landscape and "
                             f"layer; got a filled {type(cache).__name__}")
        return cache, use_cache

    def _kept_positions(self, input_ids, attention_mask, labels, logits_to_keep, past) -> torch.Tensor:
        check_inputs(input_ids, self.config, past, attention_mask, labels)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0 keeps every position, N the last N), got "
                             f"{logits_to_keep!r}")
        seq = input_ids.shape[1]
        n_keep = min(logits_to_keep, seq) if logits_to_keep else seq
        return torch.arange(seq - n_keep, seq, device=input_ids.device)

    def _start(self, initial_logits, positions, num_candidates) -> torch.Tensor:
        """The descent's starting logits (float32 or wider, whatever the weights' dtype), candidates along the
        query axis."""
        if initial_logits is None:
            return self.initial_logits(positions, num_candidates)
        expected = (*positions.shape, self.config.vocab_size)
        if tuple(initial_logits.shape) != expected:
            raise ValueError(f"initial_logits must have the shape of the logits, batch × positions × vocab = "
                             f"{expected}, got {tuple(initial_logits.shape)}")
        return initial_logits.to(softmax_dtype(self.alpha)).repeat(1, num_candidates, 1)

    def _final_energies(self, energy_fn, descent, landscape):
        return self._energy_of(energy_fn, descent.states[-1], landscape)

    def _energy_function(self, input_ids, attention_mask, position_ids, cache, keep, thinking, schedule,
                         create_graph):
        """energy(probs, landscape) for the kept positions, repeated `num_candidates` times along the query axis."""
        n_cand = thinking.num_candidates
        if thinking.recompute:
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
        queries = keep.repeat(n_cand)
        energy = self.compiled_energy if self.compiled_energy is not None and not create_graph else self.model.energy
        # a generated token (no more new tokens than candidates) observes each landscape in its first step there
        folded = set(schedule) if self._folds(cache, input_ids, len(queries), create_graph) else set()
        with torch.set_grad_enabled(create_graph):
            inputs = {k: self.model.candidate_inputs(self.model.observe(input_ids, k, position_ids, attention_mask,
                                                                        cache, create_graph), queries)
                      for k in range(self.config.num_landscapes)
                      if k not in folded and (k in landscapes or cache is not None)}

        def energy_fn(probs, landscape, context=None, rows=None):
            if context is not None:  # rows `rows` of the batch, over these keys and values (`RebuiltStep`)
                return energy(probs, inputs[landscape].select_rows(rows, list(zip(context[::2], context[1::2]))))
            if landscape in inputs:
                return energy(probs, inputs[landscape])
            result, inputs[landscape] = self.model.observe_and_energy(input_ids, probs, queries, landscape,
                                                                      position_ids, attention_mask, cache)
            return result
        energy_fn.context_tensors = lambda landscape: [t for kv in inputs[landscape].kv for t in kv]
        return energy_fn

    def _folds(self, cache, input_ids, num_queries, create_graph) -> bool:
        """Whether the first descent step in each landscape also observes the new tokens (`observe_and_energy`):
        in generation with a cache, when the new tokens are no more than the candidates (a prompt's prefill, many
        tokens for one candidate, observes on its own: folding it would add its rows to every backward)."""
        return (cache is not None and not create_graph and self.compiled_energy is None
                and input_ids.shape[1] <= num_queries)

    def _select_candidates(self, descent: Descent, n_cand: int) -> Descent:
        """Self-verification: per position, the candidate with the lowest final energy."""
        if n_cand == 1:
            return descent
        n_keep = descent.final_energies.shape[1] // n_cand
        best = descent.final_energies.unflatten(1, (n_cand, n_keep)).argmin(dim=1)  # batch × positions

        def pick(t, lead):  # t: lead dims × batch × (candidates · positions) × rest
            t = t.unflatten(lead + 1, (n_cand, n_keep))
            rest = t.dim() - lead - 3
            index = best.view(*([1] * lead), *best.shape[:1], 1, n_keep, *([1] * rest))
            index = index.expand(*t.shape[:lead + 1], 1, *t.shape[lead + 2:])
            return t.gather(lead + 1, index).squeeze(lead + 1)
        lead = {"states": 1, "energies": 1}
        return Descent(**{f.name: pick(getattr(descent, f.name), lead.get(f.name, 0)) for f in fields(descent)})

    @staticmethod
    def _targets(labels, attention_mask, keep) -> torch.Tensor:
        """The next token of each kept position (batch × positions), -100 where there is none or it is padding."""
        targets = labels.clone()
        if attention_mask is not None:
            targets = targets.masked_fill(attention_mask == 0, -100)
        return torch.cat((targets[:, 1:], torch.full_like(targets[:, :1], -100)), dim=1)[:, keep]

    def _loss(self, descent, targets, energy_fn, num_candidates=1):
        step_losses = torch.stack([
            F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
            for logits in descent.states])
        if (targets == -100).all():
            raise ValueError("labels has no token to predict: every target is -100 or padding")
        loss = step_losses[-1] if self.config.truncate_mcmc else step_losses.mean()
        if self.config.contrastive_loss_coeff > 0:
            contrastive = self._contrastive(descent.energies[-1], targets, energy_fn, num_candidates)
            loss = loss + self.config.contrastive_loss_coeff * contrastive
        return loss, step_losses.detach()

    def _ranked_loss(self, descent, final_energies, targets, energy_fn, n_cand):
        """`ranking_loss_coeff`: every candidate's descent in the loss (each is a prediction like any other), plus
        the ranking of the candidates by their final energies."""
        loss, step_losses = self._loss(descent, targets.repeat(1, n_cand), energy_fn)
        ranking = self._ranking(descent.states[-1], final_energies, targets, n_cand)
        return loss + self.config.ranking_loss_coeff * ranking, step_losses

    @staticmethod
    def _ranking(final_logits, final_energies, targets, n_cand):
        """Self-verification, trained: per position, cross-entropy of softmax(−E) over the candidates' final energies
        against the candidate whose final logits give the true next token the highest probability (for two
        candidates, a logistic loss on their energy difference)."""
        with torch.no_grad():
            log_probs = F.log_softmax(final_logits.float(), dim=-1).unflatten(1, (n_cand, -1))  # B × n × K × V
            index = targets.clamp(min=0)[:, None, :, None].expand(-1, n_cand, -1, 1)
            best = log_probs.gather(-1, index).squeeze(-1).argmax(dim=1)  # batch × positions
        scores = -final_energies.float().unflatten(1, (n_cand, -1)).transpose(1, 2)  # batch × positions × n
        valid = targets != -100
        return F.cross_entropy(scores[valid], best[valid])

    def _contrastive(self, predicted_energy, targets, energy_fn, num_candidates=1):
        """Cross-entropy that ranks the true next token's energy below the final prediction's (of the chosen
        candidate; `energy_fn` scores every candidate's queries, so the true token is scored once per candidate)."""
        valid = targets != -100
        one_hot = F.one_hot(targets.clamp(min=0), self.config.vocab_size).to(predicted_energy.dtype)
        true_energy = energy_fn(one_hot.repeat(1, num_candidates, 1), self.config.num_landscapes - 1)
        true_energy = true_energy[:, :targets.shape[1]]
        scores = -torch.stack((true_energy, predicted_energy), dim=-1)[valid]
        return F.cross_entropy(scores, torch.zeros(len(scores), dtype=torch.long, device=scores.device))

    # --- TRL's fused LM head ----------------------------------------------------------------------------------

    def __setattr__(self, name, value):
        """TRL's trainers replace `forward` by a "fused LM head" that projects the base model's hidden states through
        the output embeddings; an EBT has neither (its logits come from the descent). `forward` answers TRL's
        `fused_lm_head=True` calls itself, so that replacement is declined, keeping the temperature it carries."""
        func = getattr(value, "__func__", None)
        if name == "forward" and "fused_lm_head" in getattr(getattr(func, "__code__", None), "co_varnames", ()):
            cells = dict(zip(func.__code__.co_freevars, func.__closure__ or ()))
            temperature = cells["temperature"].cell_contents if "temperature" in cells else 1.0
            object.__setattr__(self, "fused_lm_head_temperature", float(temperature))
            return
        super().__setattr__(name, value)

    def fused_lm_head_forward(self, input_ids, labels, attention_mask, position_ids, kwargs) -> "EBTFusedLMHeadOutput":
        """TRL's fused-head outputs: the log-probability of each label under the likelihood the model's loss uses
        (the mean over descent steps, only the last with `truncate_mcmc`), so that TRL's NLL is the model's loss;
        entropy and the metrics from the final logits. Padding-free rows (documents back to back, `position_ids`
        restarting at 0) are descended as one padded row per document, so documents never attend to each other."""
        if (self.config.contrastive_loss_coeff > 0 or self.config.ranking_loss_coeff > 0
                or (self.config.mcmc_replay_buffer and self.training)):
            raise ValueError("TRL's trainers compute the loss from per-token log-probabilities, which cannot hold the "
                             "contrastive or ranking terms (contrastive_loss_coeff, ranking_loss_coeff > 0) or "
                             "replayed rows (mcmc_replay_buffer); "
                             "train such a model with transformers' Trainer or modeling_ebt.training.EBTTrainer")
        step_logits = packed_step_logits(self, input_ids, attention_mask, position_ids)
        step_logits = step_logits / getattr(self, "fused_lm_head_temperature", 1.0)
        targets, valid = kwargs.get("shift_labels"), attention_mask
        if targets is None:
            step_logits, targets = step_logits[:, :, :-1], labels[:, 1:]
            valid = None if attention_mask is None else attention_mask[:, 1:]
        if valid is not None:
            targets = targets.masked_fill(valid == 0, -100)
        return fused_lm_head_output(step_logits, targets, self.config.truncate_mcmc, kwargs.get("num_items_in_batch"))

    # --- generation -------------------------------------------------------------------------------------------

    @leaves_inference_mode
    def generate(self, inputs=None, generation_config=None, *, mcmc_num_steps=None, mcmc_step_size=None,
                 langevin_dynamics_noise=None, num_candidates=None, energy_tolerance=None, accept_lower_energies=None,
                 damp_extra_steps=None, recompute=None, **kwargs):
        """`transformers` generation with energy descent for every new token.

        Thinking knobs (default: the model's `generation_config`, else the trained behaviour): mcmc_num_steps,
        mcmc_step_size, langevin_dynamics_noise, num_candidates (self-verification), energy_tolerance (adaptive
        early stop), accept_lower_energies (a step counts only where it lowers the energy), damp_extra_steps (steps
        beyond the trained count average their updates); recompute=True generates
        the reference's way (no cache), as a baseline. With `return_dict_in_generate=True` the output carries
        `energies` and `descent_steps` per generated token.
        """
        config = generation_config or self.generation_config

        def knob(value, name, default=None):
            return value if value is not None else getattr(config, name, default)

        thinking = ThinkingConfig(
            steps=knob(mcmc_num_steps, "mcmc_num_steps"), step_size=knob(mcmc_step_size, "mcmc_step_size"),
            langevin_noise=knob(langevin_dynamics_noise, "langevin_dynamics_noise"),
            num_candidates=knob(num_candidates, "num_candidates", 1),
            energy_tolerance=knob(energy_tolerance, "energy_tolerance"),
            accept_lower_energies=bool(knob(accept_lower_energies, "accept_lower_energies")),
            damp_extra_steps=bool(knob(damp_extra_steps, "damp_extra_steps")),
            recompute=bool(knob(recompute, "recompute")))
        self._check_generation_request(inputs if inputs is not None else kwargs.get("input_ids"), config, kwargs)
        if thinking.recompute:
            kwargs["use_cache"] = False
        if not kwargs.get("return_dict_in_generate", getattr(config, "return_dict_in_generate", False)):
            return super().generate(inputs, generation_config, thinking=thinking, **kwargs)
        steps = []  # per forward call: the final energies and the descent steps of the new token
        hook = self.register_forward_hook(lambda module, args, out: steps.append((out.final_energies,
                                                                                  out.descent_steps)))
        try:
            output = super().generate(inputs, generation_config, thinking=thinking, output_final_energies=True,
                                      **kwargs)
        finally:
            hook.remove()
        energies, descent_steps = (torch.cat(column, dim=1) for column in zip(*steps))
        return EBTGenerateOutput(**dict(output.items()), energies=energies, descent_steps=descent_steps)

    def _check_generation_request(self, input_ids, config, kwargs):
        if isinstance(input_ids, torch.Tensor) and (input_ids.dim() != 2 or input_ids.shape[-1] == 0):
            raise ValueError(f"generate needs a non-empty prompt (batch × tokens), got shape {tuple(input_ids.shape)}")
        if isinstance(input_ids, torch.Tensor):
            self._check_generation_length(input_ids.shape[1], config, kwargs)
        beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
        if beams > 1:
            raise ValueError("EBTForCausalLM.generate does not support beam search (num_beams > 1); use greedy or "
                             "sampling decoding, and num_candidates for energy-based self-verification")
        for name in ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha"):
            if kwargs.get(name) is not None or getattr(config, name, None) is not None:
                raise ValueError(f"EBTForCausalLM.generate does not support `{name}`: only greedy and sampling "
                                 f"decoding run energy descent")

    def _check_generation_length(self, prompt: int, config, kwargs):
        """Refuse, before any work, a generation that would run past max_position_embeddings."""
        limit = self.config.max_position_embeddings
        if prompt > limit:
            raise ValueError(f"the prompt of {prompt} tokens is longer than the model's max_position_embeddings="
                             f"{limit}; truncate it")
        max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if max_new is not None:
            total, asked = prompt + max_new, f"a prompt of {prompt} tokens + max_new_tokens={max_new}"
        else:
            total = kwargs.get("max_length", getattr(config, "max_length", None))
            asked = f"max_length={total}"
        if total is not None and total > limit:
            raise ValueError(f"generate would reach {total} tokens ({asked}), more than the model's "
                             f"max_position_embeddings={limit}: ask for at most "
                             f"max_new_tokens={max(limit - prompt, 0)} (max_length={limit}) or shorten the prompt")


@dataclass
class EBTFusedLMHeadOutput(ModelOutput):
    """What TRL's trainers read from `forward(..., labels=labels, fused_lm_head=True)` (TRL's `FusedCausalLMOutput`).
    Per-token fields are batch × (positions − 1) (positions with `shift_labels`), zero where the label is -100.

    loss: the negative log-likelihood summed over the labels, divided by their count (or `num_items_in_batch`).
    log_probs: log-probability of each label, with the gradient. entropy, log_sum_sq_probs, mean_logits, is_top1:
    of the final logits' distribution, without gradient. label_mask: where the label is not -100.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def fused_lm_head_output(step_logits, targets, last_step_only, num_items_in_batch=None) -> EBTFusedLMHeadOutput:
    """step_logits: steps × batch × positions × vocab; targets: batch × positions (-100 ignored)."""
    mask = targets != -100
    step_log_probs = F.log_softmax(step_logits.float(), dim=-1)
    index = targets.clamp(min=0)[None, ..., None].expand(len(step_logits), -1, -1, 1)
    per_step = step_log_probs.gather(-1, index).squeeze(-1)  # steps × batch × positions
    log_probs = (per_step[-1] if last_step_only else per_step.mean(0)).masked_fill(~mask, 0.0)
    with torch.no_grad():
        final, logits = step_log_probs[-1], step_logits[-1].float()
        entropy = -(final.exp() * final).sum(-1).masked_fill(~mask, 0.0)
        log_sum_sq_probs = torch.logsumexp(2 * final, dim=-1).masked_fill(~mask, 0.0)
        mean_logits = logits.mean(-1).masked_fill(~mask, 0.0)
        is_top1 = (logits.argmax(-1) == targets) & mask
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return EBTFusedLMHeadOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                log_sum_sq_probs=log_sum_sq_probs, mean_logits=mean_logits, is_top1=is_top1,
                                label_mask=mask)


def packed_step_logits(model, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Every descent step's logits (steps × batch × positions × vocab). Rows whose `position_ids` restart at 0
    (padding-free packing, no attention mask) are split into one padded row per document and put back after."""
    restarts = position_ids is not None and attention_mask is None and bool((position_ids[:, 1:] == 0).any())
    if not restarts:
        return model(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                     output_step_logits=True).step_logits
    starts = position_ids == 0
    starts[:, 0] = True
    flat_starts = starts.flatten()
    document = flat_starts.cumsum(0) - 1  # each token's document
    column = torch.arange(len(document), device=document.device) - flat_starts.nonzero().squeeze(1)[document]
    shape = (int(document[-1]) + 1, int(column.max()) + 1)
    ids = input_ids.new_full(shape, model.config.pad_token_id or 0)
    ids[document, column] = input_ids.flatten()
    mask = torch.zeros_like(ids)
    mask[document, column] = 1
    step_logits = model(ids, attention_mask=mask, use_cache=False, output_step_logits=True).step_logits
    return step_logits[:, document, column].unflatten(1, input_ids.shape)


# save_pretrained / push_to_hub copy this file (and configuration_ebt.py) next to the weights, with auto_map entries
EBTModel.register_for_auto_class("AutoModel")
register_checkpoint_conversion_mapping("EBTForCausalLM", [WeightConverter("alpha", "alpha", [AlphaAsVector()])],
                                       overwrite=True)  # overwrite: the package and its copy as remote code
EBTForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = ["EBTPreTrainedModel", "EBTModel", "EBTForCausalLM", "EBTCache", "ThinkingConfig"]
