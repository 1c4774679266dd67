"""Configuration of an Energy-Based Transformer (EBT).

Field names follow `transformers` (Llama) for the transformer and the reference implementation
(github alexiglad/EBT) for the energy-descent options, so users of either find their way. The defaults are
the paper's System 1 recipe for the "xxs" size on a byte-level vocabulary.
"""

import math

from transformers import PreTrainedConfig

EBT_TYPES = ("default", "time_embed")
INITIAL_CONDITIONS = ("random_noise", "zeros")


class ValidatedConfig:
    """Validation in one place, for the EBT configs (mixed in before `PreTrainedConfig`): every assignment of a field
    (construction, `from_pretrained(..., field=value)`, later `config.field = value`) checks that field alone
    (`field_rules`: field -> (check, what is expected)); `validate` checks all fields and the relations between them
    (`_check_relations`), after construction, after loading (`from_dict`) and before `save_pretrained` writes
    config.json. `intermediate_size` and `num_key_value_heads` default to `hidden_size` and `num_attention_heads`."""

    field_rules = {}  # set per config class, below the rules
    # head_dim must be a multiple of this: rotary embeddings rotate pairs of dimensions (along two axes for images)
    head_dim_multiple, head_dim_reason = 2, "rotary embeddings rotate pairs of dimensions"

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = self.hidden_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)
        self.validate()

    def __setattr__(self, key, value):
        if key in self.field_rules:
            _check_field(key, value, self.field_rules, type(self).__name__)
        super().__setattr__(key, value)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        loaded = super().from_dict(config_dict, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        config.validate()
        return loaded

    def validate(self):
        super().validate()
        for field in self.field_rules:
            _check_field(field, getattr(self, field), self.field_rules, type(self).__name__)
        self._check_relations()

    def _require(self, ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{field}={getattr(self, field)!r} is invalid: expected {expected}.")

    def _check_relations(self):
        """The relations of the fields both models have: the transformer's shape and the random step counts."""
        require = self._require
        for field in ("intermediate_size", "num_key_value_heads"):
            require(getattr(self, field) is not None, field, "an integer >= 1")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                f"a multiple of num_attention_heads={self.num_attention_heads}")
        require(self.head_dim % self.head_dim_multiple == 0, "hidden_size",
                f"hidden_size / num_attention_heads to be a multiple of {self.head_dim_multiple} "
                f"({self.head_dim_reason})")
        require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                f"a divisor of num_attention_heads={self.num_attention_heads}")
        require(self.randomize_mcmc_num_steps_min <= self.randomize_mcmc_num_steps + 1,
                "randomize_mcmc_num_steps_min", f"an integer in [1, randomize_mcmc_num_steps + 1 = "
                f"{self.randomize_mcmc_num_steps + 1}]")


class EBTConfig(ValidatedConfig, PreTrainedConfig):
    r"""
    Transformer:
        vocab_size, hidden_size, intermediate_size (default: hidden_size, the reference's ffn multiplier 1),
        num_hidden_layers, num_attention_heads, num_key_value_heads (GQA/MQA; default: num_attention_heads),
        rms_norm_eps, rope_theta, max_position_embeddings (the longest `input_ids` the model accepts; the
        reference's `context_length` + 1), sliding_window (None: full attention; W: each token sees the last W
        observed tokens, see the README), num_sink_tokens (with a sliding window: this many leading observed
        tokens stay visible to every token, "attention sinks").

    Energy descent ("thinking"; names of the reference):
        ebt_type: "default" (one energy landscape) or "time_embed" (one learned landscape token per step).
        mcmc_num_steps: descent steps in training (and the number of landscapes for "time_embed").
        mcmc_step_size: initial step size α. mcmc_step_size_learnable: train α.
        mcmc_step_size_lr_multiplier: α's learning rate = base lr × this (see `ebt_optimizer_groups`).
        denoising_initial_condition: "random_noise" (N(0, gaussian_random_noise_scaling²)) or "zeros".
        normalize_initial_condition: descend on softmax(logits) (the paper); otherwise on the raw logits.
        vocab_to_embed_uses_prob_dist: embed candidates with the tied token embedding matrix (p · E) instead of a
            separate V×D linear.
        langevin_dynamics_noise: std of the Gaussian noise added to the logits before every step.

    System 2 training (only active in training mode):
        randomize_mcmc_num_steps: R > 0 draws the number of steps on the last landscape uniformly from
            [randomize_mcmc_num_steps_min, R + 1] (evaluation uses R + 1).
        randomize_mcmc_step_size_scale: s > 1 scales α per position by U[1/s, s].
        mcmc_replay_buffer: start part of each batch from the final logits of earlier batches
            (mcmc_replay_buffer_size sequences kept, mcmc_replay_buffer_sample_fraction of the batch replaced).
        truncate_mcmc: only the last step enters the loss and the graph (earlier steps are first-order).
        no_mcmc_detach: backpropagate through the whole chain instead of detaching between steps.
        contrastive_loss_coeff: weight of a contrastive term that pushes the true next token's energy below the
            prediction's (0 disables it).
        ranking_loss_coeff: weight of a candidate-ranking term (0 disables it): in training each position descends
            `ranking_num_candidates` candidates, all of them enter the loss, and the final energies of the candidates
            (scored on their detached final logits) are trained by cross-entropy of softmax(−E) to pick the one that
            predicts the true next token best: the self-verification of inference (`num_candidates`), trained.

    Memory:
        checkpointing_chunks: with activation checkpointing, each descent step's graph is rebuilt in the backward
            for this many slices of the batch in turn (the energies of different sequences are independent), so
            that one slice's second-order graph is alive at a time; 1 rebuilds the whole batch at once (as the
            `recompute` baseline always does).
    """

    model_type = "ebt"

    vocab_size: int = 257
    hidden_size: int = 384
    intermediate_size: int | None = None
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 257
    sliding_window: int | None = None
    num_sink_tokens: int = 0
    initializer_gain: float = 1.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    ebt_type: str = "time_embed"
    mcmc_num_steps: int = 2
    mcmc_step_size: float = 500.0
    mcmc_step_size_learnable: bool = True
    mcmc_step_size_lr_multiplier: float = 1500.0
    denoising_initial_condition: str = "random_noise"
    gaussian_random_noise_scaling: float = 1.0
    normalize_initial_condition: bool = True
    vocab_to_embed_uses_prob_dist: bool = False
    langevin_dynamics_noise: float = 0.0

    randomize_mcmc_num_steps: int = 0
    randomize_mcmc_num_steps_min: int = 1
    randomize_mcmc_step_size_scale: float = 1.0
    mcmc_replay_buffer: bool = False
    mcmc_replay_buffer_size: int = 1024
    mcmc_replay_buffer_sample_fraction: float = 0.5
    truncate_mcmc: bool = False
    no_mcmc_detach: bool = False
    contrastive_loss_coeff: float = 0.0
    ranking_loss_coeff: float = 0.0
    ranking_num_candidates: int = 2
    checkpointing_chunks: int = 4


    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def evaluation_steps(self) -> int:
        """Descent steps per token in evaluation and generation: the training steps, with the last landscape
        descended `randomize_mcmc_num_steps` more times (the most that System 2 training draws)."""
        return self.mcmc_num_steps + self.randomize_mcmc_num_steps

    @property
    def fewest_training_steps(self) -> int:
        """The fewest descent steps System 2 training draws (the training steps when they are not random): the
        paper's "no thinking" point and the reference's default number of inference steps."""
        low = self.randomize_mcmc_num_steps_min if self.randomize_mcmc_num_steps else 1
        return self.mcmc_num_steps - 1 + low

    @property
    def num_landscapes(self) -> int:
        """Energy landscapes: one per training step for `time_embed`, a single one for `default`."""
        return self.mcmc_num_steps if self.ebt_type == "time_embed" else 1

    def _check_relations(self):
        super()._check_relations()
        require = self._require
        require(self.sliding_window is None or self.sliding_window <= self.max_position_embeddings, "sliding_window",
                f"None or an integer in [1, max_position_embeddings={self.max_position_embeddings}]")
        require(self.num_sink_tokens < self.max_position_embeddings, "num_sink_tokens",
                f"an integer in [0, max_position_embeddings={self.max_position_embeddings})")
        require(self.num_sink_tokens == 0 or self.sliding_window is not None, "num_sink_tokens",
                "0 without a sliding_window (under full attention every token is visible anyway)")
        require(self.normalize_initial_condition or not self.vocab_to_embed_uses_prob_dist,
                "vocab_to_embed_uses_prob_dist", "False when normalize_initial_condition=False (p · E needs a "
                "probability distribution)")
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            ids = getattr(self, field)
            ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
            require(all(i < self.vocab_size for i in ids), field,
                    f"None or token ids in [0, vocab_size={self.vocab_size})")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_ids(value) -> bool:
    ids = value if isinstance(value, list) and value else [value]
    return value is None or all(_is_int(i) and i >= 0 for i in ids)


_POSITIVE_INT = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_OPTIONAL_POSITIVE_INT = (lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1")
_POSITIVE_NUMBER = (lambda v: _is_finite(v) and v > 0, "a number > 0 (and finite)")
_NON_NEGATIVE_NUMBER = (lambda v: _is_finite(v) and v >= 0, "a number >= 0 (and finite)")
_BOOL = (lambda v: isinstance(v, bool), "True or False")
_TOKEN_ID = (lambda v: v is None or (_is_int(v) and v >= 0), "None or a token id (an integer >= 0)")

# field -> (check of the value alone, what is expected); relations between fields are in `_check_relations`
FIELD_RULES = {
    **dict.fromkeys(("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "mcmc_num_steps", "mcmc_replay_buffer_size", "checkpointing_chunks"),
                    _POSITIVE_INT),
    **dict.fromkeys(("intermediate_size", "num_key_value_heads"), _OPTIONAL_POSITIVE_INT),
    "sliding_window": (lambda v: v is None or (_is_int(v) and v >= 1),
                       "None or an integer in [1, max_position_embeddings] (None: full attention)"),
    "num_sink_tokens": (lambda v: _is_int(v) and v >= 0, "an integer in [0, max_position_embeddings)"),
    **dict.fromkeys(("rms_norm_eps", "rope_theta", "mcmc_step_size", "initializer_gain"), _POSITIVE_NUMBER),
    **dict.fromkeys(("mcmc_step_size_lr_multiplier", "gaussian_random_noise_scaling", "langevin_dynamics_noise",
                     "contrastive_loss_coeff", "ranking_loss_coeff"), _NON_NEGATIVE_NUMBER),
    "ranking_num_candidates": (lambda v: _is_int(v) and v >= 2, "an integer >= 2 (the candidates ranked per position)"),
    "ebt_type": (lambda v: v in EBT_TYPES, f"one of {EBT_TYPES}"),
    "denoising_initial_condition": (lambda v: v in INITIAL_CONDITIONS, f"one of {INITIAL_CONDITIONS}"),
    "randomize_mcmc_num_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 disables random step counts)"),
    "randomize_mcmc_num_steps_min": (_POSITIVE_INT[0], "an integer in [1, randomize_mcmc_num_steps + 1]"),
    "randomize_mcmc_step_size_scale": (lambda v: _is_finite(v) and v >= 1,
                                       "a number >= 1 (and finite; 1 disables random step sizes)"),
    "mcmc_replay_buffer_sample_fraction": (lambda v: _is_finite(v) and 0 < v < 1, "a number in (0, 1)"),
    **dict.fromkeys(("mcmc_step_size_learnable", "normalize_initial_condition", "vocab_to_embed_uses_prob_dist",
                     "mcmc_replay_buffer", "truncate_mcmc", "no_mcmc_detach", "use_cache"), _BOOL),
    "pad_token_id": _TOKEN_ID,
    "bos_token_id": _TOKEN_ID,
    "eos_token_id": (_is_token_ids, "None, a token id or a non-empty list of token ids (integers >= 0)"),
    "tie_word_embeddings": (lambda v: v is False, "False: an EBT has no output embedding to tie (use "
                            "vocab_to_embed_uses_prob_dist to share the token embedding with the candidates)"),
}


def _check_field(field: str, value, rules: dict | None = None, owner: str = "EBTConfig") -> None:
    """Raises the error of `field`'s rule in `rules` (default: EBTConfig's `FIELD_RULES`) naming `owner`."""
    ok, expected = (FIELD_RULES if rules is None else rules)[field]
    if not ok(value):
        raise ValueError(f"{owner}.{field}={value!r} is invalid: expected {expected}.")


EBTConfig.field_rules = FIELD_RULES
EBTConfig.register_for_auto_class()  # save_pretrained / push_to_hub write this file and an auto_map entry

__all__ = ["EBTConfig"]
