"""Tests of the Diffusion Transformer baseline (modeling_ebt.dit_baseline): schedule, t*, reverse process, sizing.

Fast and offline: tiny DiTs (8×8 images, patch 2) on crops of the shipped photos. The DDIM step is checked against
diffusers' own DDIMScheduler, the chain against an oracle that knows the clean image.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from modeling_ebt import images
from modeling_ebt.dit_baseline import (
    DiTDenoiser,
    count_dit_parameters,
    dit_config_for_parameters,
    reference_scheduler,
    respaced_timesteps,
)


def tiny_dit(**overrides) -> DiTDenoiser:
    torch.manual_seed(0)
    settings = dict(image_size=8, patch_size=2, num_layers=2, num_heads=2, head_dim=16) | overrides
    return DiTDenoiser.from_size(**settings)


def random_images(batch=4, size=8, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class Oracle:
    """Predicts the exact noise of ``x`` relative to a known clean image: ε = (x − sqrt(ᾱ_t)·clean) / sqrt(1 − ᾱ_t)."""

    def __init__(self, denoiser: DiTDenoiser, clean: torch.Tensor):
        self.denoiser, self.clean, self.calls = denoiser, clean, 0

    def __call__(self, noisy, timesteps):
        self.calls += 1
        alpha_bar = self.denoiser.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return (noisy - alpha_bar.sqrt() * self.clean) / (1 - alpha_bar).sqrt()


# ---------------------------------------------------------------------------------------------------- schedule


def test_scheduler_is_the_reference_schedule_and_noises_like_add_noise():
    denoiser = tiny_dit()
    reference = torch.from_numpy(images.reference_alphas_cumprod(0.2))
    assert denoiser.scheduler.config.num_train_timesteps == 500
    torch.testing.assert_close(denoiser.alphas_cumprod.double(), reference, atol=1e-6, rtol=0)
    clean = random_images()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(7))
    by_scheduler = denoiser.scheduler.add_noise(clean, noise, torch.full((4,), 99))
    by_add_noise = images.add_noise(clean, 0.2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(by_scheduler, by_add_noise, atol=1e-6, rtol=0)


@pytest.mark.parametrize("level", [0.1, 0.2, 0.3])
def test_t_star_is_the_step_whose_alpha_bar_matches_the_level(level):
    denoiser = tiny_dit()
    t_star = denoiser.timestep_for_level(level)
    target = images.noise_alpha_bar(level)
    gaps = (denoiser.alphas_cumprod.double() - target).abs()
    assert gaps[t_star] == gaps.min()
    assert gaps[t_star] < abs(denoiser.alphas_cumprod[t_star] - denoiser.alphas_cumprod[t_star + 1])
    if level == 0.2:
        assert t_star == 99 == denoiser.max_train_timestep  # the reference's t = diffusion_steps - 1
    assert (denoiser.timestep_for_level(0.1) < denoiser.timestep_for_level(0.2) < denoiser.timestep_for_level(0.3))


def test_respaced_timesteps_run_from_t_star_to_zero():
    assert respaced_timesteps(99, 5) == [99, 74, 50, 25, 0]
    assert respaced_timesteps(99, 100) == list(range(99, -1, -1))
    assert respaced_timesteps(99, 1) == [99]
    with pytest.raises(ValueError, match="steps=101 exceeds the 100 timesteps from t\\*=99 to 0; use repeats"):
        respaced_timesteps(99, 101)
    with pytest.raises(ValueError, match="positive integer"):
        respaced_timesteps(99, 0)


# ------------------------------------------------------------------------------------------------ reverse process


@pytest.mark.parametrize("timestep,stride", [(99, 20), (19, 20), (250, 50)])
def test_ddim_step_matches_diffusers_ddim_scheduler(timestep, stride):
    denoiser = tiny_dit()
    config = reference_scheduler(0.2).config
    ddim = DDIMScheduler(
        num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start, beta_end=config.beta_end,
        beta_schedule="linear", clip_sample=True, set_alpha_to_one=True, prediction_type="epsilon",
    )
    ddim.set_timesteps(config.num_train_timesteps // stride)
    sample, noise = random_images(seed=1) * 1.5, random_images(seed=2)  # big enough that x_0 gets clamped
    expected = ddim.step(noise, timestep, sample, eta=0.0, use_clipped_model_output=True).prev_sample
    previous = timestep - stride if timestep >= stride else -1
    torch.testing.assert_close(denoiser._ddim_step(noise, timestep, previous, sample), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("steps,repeats", [(1, 1), (5, 1), (100, 2)])
def test_reverse_process_with_an_exact_noise_predictor_recovers_the_clean_image(sampler, steps, repeats):
    denoiser = tiny_dit()
    clean = random_images() * 0.9
    oracle = Oracle(denoiser, clean)
    denoiser.predict_noise = oracle
    noisy = images.add_noise(clean, 0.2, generator=torch.Generator().manual_seed(0))
    output = denoiser.denoise(noisy, steps=steps, repeats=repeats, sampler=sampler,
                              generator=torch.Generator().manual_seed(0))
    assert output.forward_passes == oracle.calls == steps * repeats
    assert output.timesteps[0] == 99 and output.timesteps[-1] == (99 if steps == 1 else 0)
    torch.testing.assert_close(output.images, clean, atol=1e-4, rtol=0)


def test_reverse_process_counts_network_forward_passes():
    denoiser = tiny_dit()
    calls = []
    denoiser.transformer.register_forward_hook(lambda *args: calls.append(1))
    output = denoiser.denoise(images.add_noise(random_images()), steps=10, repeats=3)
    assert output.forward_passes == len(calls) == 30
    assert output.images.shape == (4, 3, 8, 8)


def test_a_few_dozen_training_steps_make_the_dit_denoise():
    torch.manual_seed(0)
    train = images.image_crops(["chelsea"], size=8, stride=4, scale=0.125)[:]["pixel_values"]
    clean = images.image_crops(["coffee"], size=8, stride=8, scale=0.125)[:]["pixel_values"][:16]
    noisy = images.add_noise(clean, 0.2, generator=torch.Generator().manual_seed(1))
    denoiser = tiny_dit()
    untrained = float(images.psnr(denoiser.denoise(noisy, steps=10).images, clean))
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    first_loss = None
    for _ in range(60):
        loss = denoiser(train[torch.randint(0, len(train), (16,), generator=generator)], generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first_loss = first_loss or loss.item()
    assert loss.item() < 0.5 * first_loss
    noisy_psnr = float(images.psnr(noisy, clean))
    trained = {steps: float(images.psnr(denoiser.denoise(noisy, steps=steps).images, clean)) for steps in (5, 100)}
    assert trained[5] > noisy_psnr + 3 and trained[100] > noisy_psnr + 3, (noisy_psnr, untrained, trained)
    assert trained[100] > untrained + 3


def test_denoise_rejects_bad_input():
    denoiser = tiny_dit()
    with pytest.raises(ValueError, match=r"batch × 3 × 8 × 8, got \(2, 1, 8, 8\)"):
        denoiser.denoise(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"batch × 3 × 8 × 8, got \(2, 3, 16, 16\)"):
        denoiser(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="NaN"):
        denoiser.denoise(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="sampler must be one of"):
        denoiser.denoise(torch.zeros(1, 3, 8, 8), sampler="euler")
    with pytest.raises(ValueError, match="noise level"):
        denoiser.denoise(torch.zeros(1, 3, 8, 8), level=2.0)


def test_training_loss_is_the_epsilon_mse_at_steps_up_to_t_star():
    denoiser = tiny_dit()
    seen = []
    original = denoiser.predict_noise
    denoiser.predict_noise = lambda noisy, steps: seen.append(steps) or original(noisy, steps)
    clean = random_images(batch=256)
    loss = denoiser(clean, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and math.isfinite(loss.item()) and loss.requires_grad
    assert 0 <= int(seen[0].min()) and int(seen[0].max()) == 99


# ------------------------------------------------------------------------------------------------------ sizing


@pytest.mark.parametrize("target,layers", [(150_000, 2), (1_000_000, 4), (3_000_000, 6)])
def test_parameter_matching_within_five_percent(target, layers):
    config = dit_config_for_parameters(target, image_size=16, patch_size=2, num_layers=layers)
    count = count_dit_parameters(config)
    assert abs(count - target) <= 0.05 * target
    assert abs(config["num_layers"] - layers) <= 1  # widths come in steps of 4: the depth moves when none fits
    denoiser = DiTDenoiser.with_parameters(target, image_size=16, patch_size=2, num_layers=layers)
    assert sum(parameter.numel() for parameter in denoiser.parameters()) == count


def test_parameter_matching_with_two_heads_keeps_the_width_a_multiple_of_four():
    config = dit_config_for_parameters(15_000, image_size=8, patch_size=2, num_layers=2, num_heads=2)
    assert config["num_attention_heads"] == 2 and config["num_attention_heads"] * config["attention_head_dim"] % 4 == 0
    assert abs(count_dit_parameters(config) - 15_000) <= 750


def test_parameter_matching_changes_depth_when_the_width_cannot_fit():
    config = dit_config_for_parameters(150_000, image_size=8, patch_size=2, num_layers=12)
    assert config["num_layers"] < 12 and config["attention_head_dim"] >= 8
    assert abs(count_dit_parameters(config) - 150_000) <= 7_500
    with pytest.raises(ValueError, match="no DiT with 4 heads of size >= 8"):
        dit_config_for_parameters(50, image_size=8, patch_size=2)


# ------------------------------------------------------------------------------------------------------ saving


def test_save_and_load_round_trip(tmp_path):
    denoiser = tiny_dit()
    noisy = images.add_noise(random_images(), generator=torch.Generator().manual_seed(0))
    denoiser.save_pretrained(tmp_path)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiTDenoiser.from_pretrained(tmp_path)
    assert loaded.max_train_timestep == 99
    torch.testing.assert_close(loaded.denoise(noisy, steps=5).images, denoiser.denoise(noisy, steps=5).images)
