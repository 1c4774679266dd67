"""Configuration of a bidirectional Energy-Based Transformer that denoises images (`EBTForImageDenoising`).

A sibling of `EBTConfig` rather than a vision section inside it. The two models share the transformer block and the
energy descent, but almost nothing else: a language EBT has a vocabulary, a context length, sliding windows, sink
tokens, a replay buffer and a contrastive term, a denoiser has an image size, patches, channels, a training noise
level and a pixel loss. One class holding both would carry a dozen fields that mean nothing for each model, and its
validation would need a mode switch. `transformers` also keys its Auto classes by config class (`model_type`): a
separate "ebt_vision" maps cleanly to `EBTVisionModel` for `AutoModel` and to `EBTForImageDenoising` for
`AutoModelForImageToImage`, and a language checkpoint can never be loaded as a denoiser by mistake.

Where the models share a concept they share the name and the check: the transformer fields are Llama's (as in
`EBTConfig`), the descent fields are the reference's names (as in `EBTConfig`, same defaults where the reference's
image scripts agree), and every field is validated by the same rules as `EBTConfig`'s (`configuration_ebt.FIELD_RULES`).
"""

from transformers import PreTrainedConfig

from .configuration_ebt import _NON_NEGATIVE_NUMBER, _POSITIVE_INT, FIELD_RULES, EBTConfig, ValidatedConfig, _is_finite

LOSS_TYPES = ("smooth_l1", "mse", "l1")


class EBTVisionConfig(ValidatedConfig, PreTrainedConfig):
    r"""
    Image and patches:
        image_size (square images of image_size × image_size pixels), patch_size (a divisor of image_size; the
        transformer sees (image_size / patch_size)² patch tokens), num_channels (3 for RGB, 1 for grey).

    Transformer (names of `EBTConfig` / Llama): hidden_size, intermediate_size (default: hidden_size, the reference's
        ffn multiplier 1), num_hidden_layers, num_attention_heads, num_key_value_heads (default: num_attention_heads),
        rms_norm_eps, rope_theta (2-D rotary embeddings: half of each head rotates with the patch row, half with
        the column, so head_dim must be a multiple of 4), initializer_gain.

    Energy descent (the same names and meaning as `EBTConfig`; the state is the image itself):
        ebt_type: "default" (one energy landscape) or "time_embed" (one learned landscape token per step).
        mcmc_num_steps, mcmc_step_size (initial α), mcmc_step_size_learnable, mcmc_step_size_lr_multiplier,
        langevin_dynamics_noise (std of the Gaussian noise added to the image before every step),
        randomize_mcmc_num_steps (+ randomize_mcmc_num_steps_min), randomize_mcmc_step_size_scale, truncate_mcmc,
        no_mcmc_detach.

    Denoising:
        noise_level: the corruption level the model is trained at (the reference's `denoise_images_noise_level`,
            0.2 in its denoising scripts; `modeling_ebt.images.add_noise` turns it into noise).
        loss_type: the reconstruction loss between each step's image and the clean image, averaged over the steps
            (only the last with truncate_mcmc): "smooth_l1" (the reference's, β = 1), "mse" or "l1".
        candidate_noise: std of the Gaussian perturbation of the noisy image that starts each candidate after the
            first in `denoise(num_candidates=N)` (the first starts from the noisy image itself).
    """

    model_type = "ebt_vision"
    head_dim_multiple, head_dim_reason = 4, "2-D rotary embeddings rotate pairs of dimensions along each of two axes"
    # the Trainer's predictions are the denoised images alone (`images`; per-step outputs have a steps axis first)
    keys_to_ignore_at_inference = ["step_images", "energies", "step_losses", "final_energies", "descent_steps"]

    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    hidden_size: int = 384
    intermediate_size: int | None = None
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_gain: float = 1.0

    ebt_type: str = "time_embed"
    mcmc_num_steps: int = 2
    mcmc_step_size: float = 1000.0
    mcmc_step_size_learnable: bool = True
    mcmc_step_size_lr_multiplier: float = 9000.0
    langevin_dynamics_noise: float = 0.0
    randomize_mcmc_num_steps: int = 0
    randomize_mcmc_num_steps_min: int = 1
    randomize_mcmc_step_size_scale: float = 1.0
    truncate_mcmc: bool = False
    no_mcmc_detach: bool = False

    noise_level: float = 0.2
    loss_type: str = "smooth_l1"
    candidate_noise: float = 0.1

    # the same derived values as a language EBT's
    head_dim = EBTConfig.head_dim
    evaluation_steps = EBTConfig.evaluation_steps
    num_landscapes = EBTConfig.num_landscapes

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    def _check_relations(self):
        super()._check_relations()
        self._require(self.image_size % self.patch_size == 0, "patch_size",
                      f"a divisor of image_size={self.image_size}")


# The language EBT's rules for the shared fields, plus the image fields'
_SHARED_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "rms_norm_eps", "rope_theta", "initializer_gain", "ebt_type", "mcmc_num_steps", "mcmc_step_size",
                  "mcmc_step_size_learnable", "mcmc_step_size_lr_multiplier", "langevin_dynamics_noise",
                  "randomize_mcmc_num_steps", "randomize_mcmc_num_steps_min", "randomize_mcmc_step_size_scale",
                  "truncate_mcmc", "no_mcmc_detach")
VISION_FIELD_RULES = {
    **{field: FIELD_RULES[field] for field in _SHARED_FIELDS},
    **dict.fromkeys(("image_size", "patch_size"), _POSITIVE_INT),
    "num_channels": _POSITIVE_INT,
    "noise_level": (lambda v: _is_finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "loss_type": (lambda v: v in LOSS_TYPES, f"one of {LOSS_TYPES}"),
    "candidate_noise": _NON_NEGATIVE_NUMBER,
}

EBTVisionConfig.field_rules = VISION_FIELD_RULES
EBTVisionConfig.register_for_auto_class()  # save_pretrained writes this file and an auto_map entry

__all__ = ["EBTVisionConfig"]
