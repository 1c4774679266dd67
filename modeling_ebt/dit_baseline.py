"""The Diffusion Transformer baseline for image denoising, as the reference's model/img/dit_denoise.py runs it.

The network is diffusers' ``DiTTransformer2DModel`` in pixel space (no VAE at this scale), unconditional: one
constant class label (the reference conditions its DiT on nothing, ``y=None``), with the label dropout meant for
classifier-free guidance switched off. Its noise schedule is a diffusers ``DDPMScheduler`` set to the reference's
schedule at the training noise level (:func:`modeling_ebt.images.reference_alphas_cumprod`: for level 0.2, T = 500
linear betas from 2e-4 to 0.04), so that the corruption of :func:`modeling_ebt.images.add_noise` at that level is
exactly the scheduler's ``x_t`` at step 99.

Training is the usual ε-prediction: ``x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε`` with t uniform in [0, t_max] and the
loss ``MSE(model(x_t, t), ε)``; t_max is the step of the training noise level (99 at 0.2), since the reference draws
t from [0, diffusion_steps) = [0, 100) of that same schedule. (The reference's DiT also learns the variance, with a
variational-bound term; a deterministic DDIM reverse process does not use it, so this baseline predicts ε only.)

Denoising, as in the reference: find the step t* whose ᾱ matches the input's noise level (:meth:`timestep_for_level`;
99 at the training level), then run the reverse process from t* down to 0 with ``steps`` forward passes, on the
integer timesteps ``round(linspace(t*, 0, steps))``; at ``steps = t* + 1`` that is every step, the reference's
100-step chain. DDIM with η = 0 (the reference's ``use_deterministic_reverse``: the predicted clean image is
clamped to [-1, 1] and the noise re-derived from it, as its ``ddim_sample`` does) or diffusers' stochastic
``DDPMScheduler.step`` on the same respaced timesteps. ``repeats`` runs the chain again from t* on its own output
(the reference's ``infer_recurse_diffusion_n_times``: its inference script denoises 100 steps twice, 200 forward
passes).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel

from .images import DEFAULT_DIFFUSION_STEPS, DEFAULT_NOISE_LEVEL, noise_alpha_bar

__all__ = ["DiTDenoiser", "DiTDenoiseOutput", "count_dit_parameters", "dit_config_for_parameters"]

SAMPLERS = ("ddim", "ddpm")
_DENOISER_FILE = "denoiser.json"


# --------------------------------------------------------------------------------------------------- sizing


def _transformer_config(image_size, patch_size, num_channels, num_layers, num_heads, head_dim) -> dict:
    return {
        "sample_size": image_size,
        "patch_size": patch_size,
        "in_channels": num_channels,
        "out_channels": num_channels,
        "num_layers": num_layers,
        "num_attention_heads": num_heads,
        "attention_head_dim": head_dim,
        "num_embeds_ada_norm": 1,  # one constant class: unconditional
    }


def count_dit_parameters(config: dict) -> int:
    """Parameters of a ``DiTTransformer2DModel`` with ``config``, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = DiTTransformer2DModel(**config)
    return sum(parameter.numel() for parameter in model.parameters())


def dit_config_for_parameters(
    target: int,
    image_size: int,
    patch_size: int,
    num_channels: int = 3,
    num_layers: int | None = None,
    num_heads: int = 4,
    tolerance: float = 0.05,
    min_head_dim: int = 8,
) -> dict:
    """A ``DiTTransformer2DModel`` config whose parameter count is within ``tolerance`` of ``target``.

    Width is ``num_heads × head_dim`` (diffusers' 2-D sin-cos position embedding needs a multiple of 4, and the
    count grows by about 2·(4/width) per step of 4, so a depth cannot always hit ±5% by width alone); for each depth,
    from ``num_layers`` (default 4) outwards, the head size (at least ``min_head_dim``) closest to the target is
    taken, and the first depth that lands within tolerance wins: the depth stays that of the model it is compared
    with when it can. Raises ``ValueError`` when no depth from 1 to 48 fits.
    """
    if not (isinstance(target, int) and target > 0):
        raise ValueError(f"target must be a positive number of parameters, got {target!r}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    preferred = 4 if num_layers is None else num_layers
    depths = sorted(range(1, 49), key=lambda depth: (abs(depth - preferred), depth))
    for depth in depths:
        config, count = _closest_width(target, image_size, patch_size, num_channels, depth, num_heads, min_head_dim)
        if config is not None and abs(count - target) <= tolerance * target:
            return config
    raise ValueError(
        f"no DiT with {num_heads} heads of size >= {min_head_dim} and 1 to 48 layers has {target} parameters "
        f"±{tolerance:.0%}"
    )


def _closest_width(target, image_size, patch_size, num_channels, num_layers, num_heads, min_head_dim):
    """Binary search on the head size (the count grows with it), then the better of the two neighbours."""
    head_dims = [size for size in range(min_head_dim, 1025) if num_heads * size % 4 == 0]
    count = lambda index: count_dit_parameters(make(head_dims[index]))  # noqa: E731
    make = lambda head_dim: _transformer_config(  # noqa: E731
        image_size, patch_size, num_channels, num_layers, num_heads, head_dim
    )
    if not head_dims or count(0) > target * 1.5:
        return None, None
    low, high = 0, len(head_dims) - 1
    while high - low > 1:
        middle = (low + high) // 2
        if count(middle) <= target:
            low = middle
        else:
            high = middle
    best = make(head_dims[min((low, high), key=lambda index: abs(count(index) - target))])
    return best, count_dit_parameters(best)


# -------------------------------------------------------------------------------------------------- denoiser


@dataclasses.dataclass
class DiTDenoiseOutput:
    """``images``: the denoised batch; ``timesteps``: the chain's steps (from t* down to 0), per repeat;
    ``forward_passes``: network evaluations per image."""

    images: torch.Tensor
    timesteps: list[int]
    forward_passes: int


def reference_scheduler(level: float = DEFAULT_NOISE_LEVEL, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS):
    """A ``DDPMScheduler`` on the reference's schedule at ``level`` (T = int(diffusion_steps / level) linear betas)."""
    num_steps = int(diffusion_steps / level)
    return DDPMScheduler(
        num_train_timesteps=num_steps,
        beta_schedule="linear",
        beta_start=1e-4 * 1000 / num_steps,
        beta_end=0.02 * 1000 / num_steps,
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def _unconditional(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Switch off the label dropout of every block (it would swap the one class for the 'null' class at random)."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return transformer


def respaced_timesteps(start: int, steps: int) -> list[int]:
    """``steps`` integer timesteps from ``start`` down to 0, evenly spaced (``start`` only when steps is 1)."""
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > start + 1:
        raise ValueError(
            f"steps={steps} exceeds the {start + 1} timesteps from t*={start} to 0; use repeats for more passes"
        )
    if steps == 1:
        return [start]
    return [int(step) for step in np.round(np.linspace(start, 0, steps))]


class DiTDenoiser(torch.nn.Module):
    """A ``DiTTransformer2DModel`` ε-predictor with the reference's noise schedule and denoising procedure."""

    def __init__(self, transformer: DiTTransformer2DModel, scheduler: DDPMScheduler, train_level: float):
        super().__init__()
        self.transformer = _unconditional(transformer)
        self.scheduler = scheduler
        self.train_level = train_level
        self.max_train_timestep = self.timestep_for_level(train_level)

    @classmethod
    def from_size(
        cls,
        image_size: int,
        patch_size: int,
        num_channels: int = 3,
        num_layers: int = 4,
        num_heads: int = 4,
        head_dim: int = 32,
        train_level: float = DEFAULT_NOISE_LEVEL,
    ) -> DiTDenoiser:
        config = _transformer_config(image_size, patch_size, num_channels, num_layers, num_heads, head_dim)
        return cls(DiTTransformer2DModel(**config), reference_scheduler(train_level), train_level)

    @classmethod
    def with_parameters(
        cls,
        target: int,
        image_size: int,
        patch_size: int,
        num_channels: int = 3,
        num_layers: int | None = None,
        num_heads: int = 4,
        train_level: float = DEFAULT_NOISE_LEVEL,
    ) -> DiTDenoiser:
        """A denoiser sized by :func:`dit_config_for_parameters` to ``target`` parameters ±5%."""
        config = dit_config_for_parameters(target, image_size, patch_size, num_channels, num_layers, num_heads)
        return cls(DiTTransformer2DModel(**config), reference_scheduler(train_level), train_level)

    # ------------------------------------------------------------------------------------------ schedule

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    def timestep_for_level(self, level: float, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS) -> int:
        """t*: the step of this schedule whose ᾱ is closest to that of :func:`add_noise` at ``level``."""
        target = noise_alpha_bar(level, diffusion_steps)
        return int(torch.argmin((self.alphas_cumprod.double() - target).abs()))

    # ------------------------------------------------------------------------------------------ training

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        labels = torch.zeros(noisy.shape[0], dtype=torch.long, device=noisy.device)
        return self.transformer(noisy, timestep=timesteps, class_labels=labels).sample

    def forward(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The ε-prediction loss on ``clean`` (B×C×H×W in [-1, 1]) with t uniform in [0, max_train_timestep]."""
        self._check_input(clean)
        batch = clean.shape[0]
        timesteps = torch.randint(0, self.max_train_timestep + 1, (batch,), generator=generator).to(clean.device)
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        return torch.nn.functional.mse_loss(self.predict_noise(noisy, timesteps), noise)

    # ------------------------------------------------------------------------------------------ denoising

    def _alpha_bar(self, timestep: int) -> float:
        return 1.0 if timestep < 0 else float(self.alphas_cumprod[timestep])

    def _ddim_step(self, noise: torch.Tensor, timestep: int, previous: int, sample: torch.Tensor) -> torch.Tensor:
        """η = 0: predict x_0 (clamped to [-1, 1]), re-derive ε from it, move to ᾱ of ``previous`` (1 past 0)."""
        alpha_bar, alpha_bar_previous = self._alpha_bar(timestep), self._alpha_bar(previous)
        clean = ((sample - math.sqrt(1 - alpha_bar) * noise) / math.sqrt(alpha_bar)).clamp(-1, 1)
        noise = (sample - math.sqrt(alpha_bar) * clean) / math.sqrt(1 - alpha_bar)
        return math.sqrt(alpha_bar_previous) * clean + math.sqrt(1 - alpha_bar_previous) * noise

    def _reverse(self, sample, timesteps, sampler, generator):
        if sampler == "ddpm":
            scheduler = copy.deepcopy(self.scheduler)  # set_timesteps changes the scheduler's state
            scheduler.set_timesteps(timesteps=timesteps)
        for index, timestep in enumerate(timesteps):
            step = torch.full((sample.shape[0],), timestep, dtype=torch.long, device=sample.device)
            noise = self.predict_noise(sample, step)
            if sampler == "ddim":
                previous = timesteps[index + 1] if index + 1 < len(timesteps) else -1
                sample = self._ddim_step(noise, timestep, previous, sample)
            else:
                sample = scheduler.step(noise, timestep, sample, generator=generator).prev_sample
        return sample

    @torch.no_grad()
    def denoise(
        self,
        noisy: torch.Tensor,
        level: float = DEFAULT_NOISE_LEVEL,
        steps: int = 100,
        repeats: int = 1,
        sampler: str = "ddim",
        generator: torch.Generator | None = None,
    ) -> DiTDenoiseOutput:
        """Denoise ``noisy`` (corrupted by :func:`add_noise` at ``level``) with ``steps × repeats`` forward passes."""
        self._check_input(noisy)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if not (isinstance(repeats, int) and repeats >= 1):
            raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
        timesteps = respaced_timesteps(self.timestep_for_level(level), steps)
        sample = noisy
        for _ in range(repeats):
            sample = self._reverse(sample, timesteps, sampler, generator)
        return DiTDenoiseOutput(images=sample, timesteps=timesteps, forward_passes=len(timesteps) * repeats)

    def _check_input(self, images: torch.Tensor) -> None:
        config = self.transformer.config
        expected = (config.in_channels, config.sample_size, config.sample_size)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            channels, height, width = expected
            raise ValueError(f"expected images of shape batch × {channels} × {height} × {width}, got {shape}")
        if not torch.isfinite(images).all():
            raise ValueError("the images contain NaN or infinite values")

    # ------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, directory: str | Path) -> None:
        """``transformer/`` (safetensors), ``scheduler/`` and ``denoiser.json`` (the training level)."""
        directory = Path(directory)
        self.transformer.save_pretrained(directory / "transformer", safe_serialization=True)
        self.scheduler.save_pretrained(directory / "scheduler")
        (directory / _DENOISER_FILE).write_text(json.dumps({"train_level": self.train_level}) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> DiTDenoiser:
        directory = Path(directory)
        settings = json.loads((directory / _DENOISER_FILE).read_text())
        transformer = DiTTransformer2DModel.from_pretrained(directory / "transformer")
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
        return cls(transformer, scheduler, settings["train_level"])
