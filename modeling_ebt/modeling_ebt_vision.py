"""A bidirectional Energy-Based Transformer that denoises images (the paper's image experiments) as a
`transformers` model.

`EBTVisionModel` is the energy function: the image is cut into patches (`image_processing_ebt.patchify`), each
patch embedded linearly, and the patch tokens run through the language EBT's blocks (`EBTDecoderLayer`: pre-RMSNorm,
attention, SwiGLU) with no mask, every patch attending to every other. With `ebt_type="time_embed"` a learned
landscape token per descent step is prepended, as in language. A scalar head gives one energy per patch, and the
image's energy is their mean, as the reference pools its head's outputs (model/img/ebt_denoise.py:
`energy_preds.mean(dim=[1])` over the patches).

Positions: 2-D rotary embeddings, rather than the reference's fixed sine-cosine table or a learned one. Half of
every head's rotated pairs turn with the patch's row, half with its column (`EBTRotaryEmbedding2D`), so attention
scores depend on the offset between two patches, not on where they are: denoising is a local, translation-
equivariant job, and a relative code says so without a parameter. It also reuses the language model's attention
unchanged (its `cos`/`sin` interface), adds no weights to learn, and lets the same weights score images of other
sizes. The landscape token sits at (0, 0), patches at (row + 1, column + 1).

`EBTForImageDenoising` denoises by the descent of `EnergyDescentMixin` (shared with `EBTForCausalLM`, one
implementation) from the noisy image itself: x ← x − α ∂E/∂x, each step's image scored against the clean one
(smooth L1, averaged over the steps, as the reference's `forward_loss_wrapper`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_ebt_vision import EBTVisionConfig
from .image_processing_ebt import patchify
from .modeling_ebt import (
    Descent,
    EBTDecoderLayer,
    EBTRMSNorm,
    EnergyDescentMixin,
    ThinkingConfig,
    hashed_normal,
    leaves_inference_mode,
    softmax_dtype,
)


class EBTRotaryEmbedding2D(nn.Module):
    """RoPE over a grid, in the language model's split-halves convention: of a head's head_dim / 2 rotated pairs,
    the first half turns with the row, the second with the column, at the frequencies of a head_dim / 2 RoPE."""

    def __init__(self, config: EBTVisionConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", self.inverse_frequencies(config), persistent=False)

    @staticmethod
    def inverse_frequencies(config: EBTVisionConfig) -> torch.Tensor:
        dim = config.head_dim // 2  # per axis
        return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))

    def forward(self, like: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1 × tokens × head_dim) for tokens at grid positions (rows, cols), in the dtype of `like`."""
        inv_freq = self.inv_freq.to(like.device)
        freqs = torch.cat((rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq), dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        return emb.cos().to(like.dtype), emb.sin().to(like.dtype)


def check_pixel_values(pixel_values, config: EBTVisionConfig, name: str = "pixel_values") -> None:
    """Clear errors for images the model cannot read: not a float batch × channels × size × size tensor, NaNs."""
    expected = f"batch × {config.num_channels} × {config.image_size} × {config.image_size}"
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({expected}), got {type(pixel_values).__name__}")
    if pixel_values.dim() != 4 or pixel_values.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty {expected} tensor, got shape {tuple(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"{name} must be floating point in [-1, 1], got {pixel_values.dtype}: turn pictures into "
                        "pixel values with EBTImageProcessor")
    if pixel_values.shape[1] != config.num_channels:
        raise ValueError(f"{name} has {pixel_values.shape[1]} channels, the model reads {config.num_channels} "
                         f"(config.num_channels); expected {expected}, got {tuple(pixel_values.shape)}")
    if tuple(pixel_values.shape[2:]) != (config.image_size, config.image_size):
        raise ValueError(f"{name} has {pixel_values.shape[2]}×{pixel_values.shape[3]} pixels, the model reads "
                         f"{config.image_size}×{config.image_size} (config.image_size): resize or crop the images "
                         f"(EBTImageProcessor resizes)")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


# --- base model: the energy function ------------------------------------------------------------------------------


class EBTVisionPreTrainedModel(PreTrainedModel):
    config: EBTVisionConfig
    config_class = EBTVisionConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _no_split_modules = ["EBTDecoderLayer"]
    _supports_sdpa = False  # the descent always takes gradients, where the blocks run explicit softmax attention

    @torch.no_grad()
    def _init_weights(self, module):
        """As the language EBT (Xavier-normal linears, zero biases, N(0, 1) landscape tokens, unit norms), except
        the energy head: zero, as the reference's (an untrained denoiser returns its input, whatever α)."""
        if isinstance(module, nn.Linear) and getattr(module, "is_energy_head", False):
            init.zeros_(module.weight)
        elif isinstance(module, nn.Linear):
            init.xavier_normal_(module.weight, gain=self.config.initializer_gain)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, EBTRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, EBTRotaryEmbedding2D):
            init.copy_(module.inv_freq, module.inverse_frequencies(self.config))
        elif isinstance(module, EBTForImageDenoising):
            init.constant_(module.alpha, self.config.mcmc_step_size)


@dataclass
class EBTVisionModelOutput(ModelOutput):
    """energies: batch, the image's energy (the mean of its patches'); patch_energies: batch × patches."""

    energies: torch.Tensor | None = None
    patch_energies: torch.Tensor | None = None


class EBTVisionModel(EBTVisionPreTrainedModel):
    """The energy function E(image) of a bidirectional EBT (landscape k for `time_embed`)."""

    def __init__(self, config: EBTVisionConfig):
        super().__init__(config)
        self.patch_embed = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        if config.ebt_type == "time_embed":
            self.time_embeddings = nn.Embedding(config.mcmc_num_steps, config.hidden_size)
        self.layers = nn.ModuleList(EBTDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = EBTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.energy_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.energy_head.is_energy_head = True  # initialised to zero (`_init_weights`)
        self.rotary_emb = EBTRotaryEmbedding2D(config)
        self.post_init()

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches: the landscape token of `time_embed`."""
        return 1 if self.config.ebt_type == "time_embed" else 0

    def grid_positions(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and columns of every token: the landscape token at (0, 0), patch (r, c) at (r + 1, c + 1)."""
        side = torch.arange(1, self.config.patches_per_side + 1, device=device)
        rows, cols = side.repeat_interleave(len(side)), side.repeat(len(side))
        if self.num_prefix_tokens:
            origin = torch.zeros(1, dtype=side.dtype, device=device)
            rows, cols = torch.cat((origin, rows)), torch.cat((origin, cols))
        return rows, cols

    def patch_energies(self, pixel_values: torch.Tensor, landscape: int = 0) -> torch.Tensor:
        """batch × patches energies of `pixel_values` (batch × channels × size × size), in their dtype."""
        weight = self.patch_embed.weight
        hidden = self.patch_embed(patchify(pixel_values, self.config.patch_size).to(weight.dtype))
        if self.num_prefix_tokens:
            token = self.time_embeddings.weight[landscape].expand(hidden.shape[0], 1, -1)
            hidden = torch.cat((token, hidden), dim=1)
        cos, sin = self.rotary_emb(hidden, *self.grid_positions(hidden.device))
        for layer in self.layers:
            hidden, _ = layer(hidden, cos, sin, None)  # no mask: every token attends to every token
        hidden = hidden[:, self.num_prefix_tokens:]
        return self.energy_head(self.norm(hidden)).squeeze(-1).to(pixel_values.dtype)

    def energy(self, pixel_values: torch.Tensor, landscape: int = 0) -> torch.Tensor:
        """One energy per image: the mean of its patches' (the function each descent step calls)."""
        return self.patch_energies(pixel_values, landscape).mean(dim=1)

    def forward(self, pixel_values: torch.Tensor, landscape: int = 0, **kwargs) -> EBTVisionModelOutput:
        check_pixel_values(pixel_values, self.config)
        if not isinstance(landscape, int) or not 0 <= landscape < self.config.num_landscapes:
            raise ValueError(f"landscape must be an integer in [0, {self.config.num_landscapes}) (the model's energy "
                             f"landscapes), got {landscape!r}")
        patch_energies = self.patch_energies(pixel_values, landscape)
        return EBTVisionModelOutput(energies=patch_energies.mean(dim=1), patch_energies=patch_energies)


# --- denoising: the descent, the loss, inference -----------------------------------------------------------------


@dataclass
class EBTImageDenoisingOutput(ModelOutput):
    """
    loss: the reconstruction loss (config.loss_type) of each step's image against `labels`, averaged over the
        steps (only the last with `truncate_mcmc`).
    images: batch × channels × height × width, the denoised images (the last step's).
    step_images: steps × batch × channels × height × width, the image after each step.
    energies: steps × batch, each step's energy (of the image the step starts from, before its update).
    step_losses: the loss of each step's image (steps), without gradient.
    final_energies: batch, the energy of the denoised images (with several candidates, or when asked).
    descent_steps: batch, the steps each image used (fewer than asked with an energy tolerance).
    """

    loss: torch.Tensor | None = None
    images: torch.Tensor | None = None
    step_images: torch.Tensor | None = None
    energies: torch.Tensor | None = None
    step_losses: torch.Tensor | None = None
    final_energies: torch.Tensor | None = None
    descent_steps: torch.Tensor | None = None


LOSSES = {"smooth_l1": lambda x, y: F.smooth_l1_loss(x, y, beta=1.0), "mse": F.mse_loss, "l1": F.l1_loss}


class EBTForImageDenoising(EnergyDescentMixin, EBTVisionPreTrainedModel):
    """Denoising by energy descent from the noisy image: `forward` (training, with `labels` = clean images) and
    `denoise` (inference, with the thinking knobs: steps, candidates, energy tolerance, Langevin noise)."""

    prediction_dims = 3  # one energy per image: channels × height × width
    accepts_loss_kwargs = False  # the loss is a mean over this batch: the Trainer scales it for accumulation
    supports_gradient_checkpointing = True

    def __init__(self, config: EBTVisionConfig):
        super().__init__(config)
        self.model = EBTVisionModel(config)
        # one element, as the language model's: FSDP shards only parameters of at least one dimension
        self.alpha = nn.Parameter(torch.full((1,), float(config.mcmc_step_size)),
                                  requires_grad=config.mcmc_step_size_learnable)
        self.gradient_checkpointing = False
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, whose config's auto_map also names the energy function for `AutoModel`
        (EBTVisionModel, in the same remote-code file), beside this class for `AutoModelForImageToImage`."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}),
                                "AutoModel": f"{EBTVisionModel.__module__.rsplit('.', 1)[-1]}.EBTVisionModel"}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @leaves_inference_mode
    def forward(self, pixel_values=None, labels=None, thinking: ThinkingConfig | None = None,
                output_final_energies: bool = False, candidate_noise: float | None = None,
                **kwargs) -> EBTImageDenoisingOutput:
        """Energy descent from the noisy `pixel_values` (batch × channels × size × size, in [-1, 1]).

        labels: the clean images → `loss`. thinking: per-call descent options (`ThinkingConfig`: steps,
        step_size, langevin_noise, num_candidates, energy_tolerance). candidate_noise: std of the perturbation
        that starts each candidate after the first (default: config.candidate_noise).
        """
        thinking = thinking or ThinkingConfig()
        self._check_request(pixel_values, labels, thinking, candidate_noise)
        n_cand = thinking.num_candidates
        start = self._start(pixel_values, n_cand, candidate_noise)
        schedule, create_graph = self.step_schedule(thinking), torch.is_grad_enabled()
        with torch.enable_grad():
            descent = self._run_descent(self.model.energy, start, schedule, thinking, create_graph)
            if n_cand > 1 or output_final_energies:
                descent.final_energies = self._energy_of(self.model.energy, descent.states[-1], schedule[-1])
        descent = self._select_candidates(descent, n_cand)
        loss, step_losses = self._loss(descent, labels)
        return EBTImageDenoisingOutput(
            loss=loss, images=descent.states[-1], step_images=descent.states, energies=descent.energies,
            step_losses=step_losses, final_energies=descent.final_energies, descent_steps=descent.steps_used)

    @torch.no_grad()
    def denoise(self, noisy: torch.Tensor, steps: int | None = None, num_candidates: int = 1,
                energy_tolerance: float | None = None, langevin_noise: float | None = None,
                step_size: float | None = None, candidate_noise: float | None = None) -> EBTImageDenoisingOutput:
        """Denoise `noisy` (batch × channels × size × size, in [-1, 1]) by energy descent ("thinking"):

        steps: descent steps (default: as trained, `config.evaluation_steps`; more reuse the last landscape);
        num_candidates: descend from N starts (the noisy image, then N − 1 perturbations of it by `candidate_noise`,
        the same for every image and run) and keep, per image, the one with the lowest final energy;
        energy_tolerance: stop an image once its energy changes by less than this between steps;
        langevin_noise: std of the noise added before every step (default: config.langevin_dynamics_noise);
        step_size: override of the learned α. Returns `images`, `step_images`, `energies`, `final_energies`, ...
        """
        thinking = ThinkingConfig(steps=steps, step_size=step_size, langevin_noise=langevin_noise,
                                  num_candidates=num_candidates, energy_tolerance=energy_tolerance)
        return self(pixel_values=noisy, thinking=thinking, output_final_energies=True, candidate_noise=candidate_noise)

    def _check_request(self, pixel_values, labels, thinking, candidate_noise):
        check_pixel_values(pixel_values, self.config)
        if labels is not None:
            check_pixel_values(labels, self.config, "labels")
            if labels.shape != pixel_values.shape:
                raise ValueError(f"labels (the clean images) must have the shape of pixel_values "
                                 f"{tuple(pixel_values.shape)}, got {tuple(labels.shape)}")
        if thinking.recompute:
            raise ValueError("thinking.recompute applies to language EBTs (their cache); an image EBT has none")
        if candidate_noise is not None and not (isinstance(candidate_noise, (int, float)) and candidate_noise >= 0):
            raise ValueError(f"candidate_noise must be a number >= 0, got {candidate_noise!r}")

    def _start(self, pixel_values, num_candidates, candidate_noise) -> torch.Tensor:
        """The descent's starting images, float32 or wider: the noisy images, then (several candidates) perturbed
        copies, candidate-major along the batch axis. The perturbation of candidate c is a fixed function of c
        (`hashed_normal`), so an image starts the same alone or in any batch, on every run."""
        start = pixel_values.to(softmax_dtype(self.alpha))
        if num_candidates == 1:
            return start
        scale = self.config.candidate_noise if candidate_noise is None else candidate_noise
        keys = torch.arange(1, num_candidates, device=start.device)
        noise = hashed_normal(keys, start[0].numel(), seed=1).to(start.dtype).view(-1, 1, *start.shape[1:])
        perturbed = (start[None] + scale * noise).flatten(0, 1)
        return torch.cat((start, perturbed))

    def _select_candidates(self, descent: Descent, n_cand: int) -> Descent:
        """Self-verification: per image, the candidate with the lowest final energy."""
        if n_cand == 1:
            return descent
        batch = descent.final_energies.shape[0] // n_cand
        best = descent.final_energies.view(n_cand, batch).argmin(dim=0)
        images = torch.arange(batch, device=best.device)

        def pick(t, lead):  # t: lead dims × (candidates · batch) × rest
            return t.unflatten(lead, (n_cand, batch))[(slice(None),) * lead + (best, images)]
        return Descent(states=pick(descent.states, 1), energies=pick(descent.energies, 1),
                       steps_used=pick(descent.steps_used, 0), final_energies=pick(descent.final_energies, 0))

    def _loss(self, descent, labels):
        if labels is None:
            return None, None
        clean = labels.to(descent.states.dtype)
        step_losses = torch.stack([LOSSES[self.config.loss_type](images, clean) for images in descent.states])
        loss = step_losses[-1] if self.config.truncate_mcmc else step_losses.mean()
        return loss, step_losses.detach()


# save_pretrained copies this file (and the files it imports) next to the weights, with auto_map entries
EBTVisionModel.register_for_auto_class("AutoModel")
EBTForImageDenoising.register_for_auto_class("AutoModelForImageToImage")

__all__ = ["EBTForImageDenoising", "EBTImageDenoisingOutput", "EBTVisionModel", "EBTVisionPreTrainedModel"]
