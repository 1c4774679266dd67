"""Tests of the denoising data (modeling_ebt.images): crops, split, corruption, metrics, picture grid.

Offline: the photos ship inside the scikit-image wheel. Expected values are computed independently here (the noise
schedule with a Python loop, PSNR with numpy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_ebt import images


@pytest.fixture(scope="module")
def splits():
    return images.load_denoising_splits(size=16, stride=16, scale=0.25)


def _reference_alpha_bar(level: float, diffusion_steps: int = 100) -> float:
    """ᾱ at t = diffusion_steps - 1 of the reference's stretched linear schedule, one factor at a time."""
    num_steps = int(diffusion_steps / level)
    beta_start, beta_end = 1e-4 * 1000 / num_steps, 0.02 * 1000 / num_steps
    product = 1.0
    for step in range(diffusion_steps):
        product *= 1.0 - (beta_start + (beta_end - beta_start) * step / (num_steps - 1))
    return product


# ------------------------------------------------------------------------------------------------------- crops


def test_crops_are_deterministic_grid_slices_of_the_photo_in_minus_one_one():
    first = images.image_crops(["chelsea"], size=16, stride=8, scale=0.25)
    second = images.image_crops(["chelsea"], size=16, stride=8, scale=0.25)
    assert torch.equal(first[:]["pixel_values"], second[:]["pixel_values"])

    photo = images.load_photo("chelsea", scale=0.25)  # 75×113
    rows, columns = (photo.shape[0] - 16) // 8 + 1, (photo.shape[1] - 16) // 8 + 1
    assert len(first) == rows * columns
    example = first[columns + 2]  # second row, third column
    assert (int(example["top"]), int(example["left"])) == (8, 16)
    expected = photo[8:24, 16:32].transpose(2, 0, 1) * 2 - 1
    np.testing.assert_allclose(example["pixel_values"].numpy(), expected, atol=1e-6)
    assert example["pixel_values"].dtype == torch.float32 and example["pixel_values"].shape == (3, 16, 16)
    assert -1 <= float(first[:]["pixel_values"].min()) and float(first[:]["pixel_values"].max()) <= 1


def test_split_is_by_source_photo_and_covers_every_photo(splits):
    train_sources, validation_sources = set(splits["train"]["source"]), set(splits["validation"]["source"])
    assert train_sources.isdisjoint(validation_sources)
    assert validation_sources == set(images.VALIDATION_PHOTOS) == {"coffee"}
    assert train_sources | validation_sources == set(images.PHOTOS)
    assert len(splits["train"]) > 4 * len(splits["validation"]) > 0


def test_photos_are_distinct_colour_photos():
    photos = {name: images.load_photo(name, scale=0.125) for name in images.PHOTOS}
    means = {name: tuple(np.round(photo.mean(axis=(0, 1)), 3)) for name, photo in photos.items()}
    assert len(set(means.values())) == len(photos), means  # no photo twice (skimage's cat is chelsea)
    for name, photo in photos.items():
        assert photo.shape[-1] == 3 and photo.dtype == np.float32
        assert photo.std() > 0.05, f"{name} is nearly flat"
        assert np.abs(photo[..., 0] - photo[..., 1]).mean() > 0.01, f"{name} is grey"


def test_bad_crop_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown photo 'lily'"):
        images.image_crops(["lily"])
    with pytest.raises(ValueError, match="non-empty list"):
        images.image_crops("coffee")
    with pytest.raises(ValueError, match="smaller than a 512-pixel crop"):
        images.image_crops(["coffee"], size=512)
    with pytest.raises(ValueError, match="scale must be"):
        images.load_photo("coffee", scale=2)


# -------------------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("level", [0.1, 0.2, 0.3])
def test_noise_schedule_matches_the_reference_formula(level):
    alpha_bar = _reference_alpha_bar(level)
    assert images.noise_alpha_bar(level) == pytest.approx(alpha_bar, rel=1e-12)
    assert images.noise_std(level) == pytest.approx(math.sqrt(1 - alpha_bar), rel=1e-12)
    assert images.signal_scale(level) == pytest.approx(math.sqrt(alpha_bar), rel=1e-12)


def test_default_level_is_sigma_0_583():
    assert images.noise_std() == pytest.approx(0.58334, abs=1e-5)
    assert images.signal_scale() == pytest.approx(0.81223, abs=1e-5)
    assert images.noise_std(0.1) < images.noise_std(0.2) < images.noise_std(0.3)


@pytest.mark.parametrize("level", [0.1, 0.3])
def test_add_noise_statistics_against_the_closed_form(level):
    clean = torch.rand(64, 3, 16, 16) * 2 - 1
    noisy = images.add_noise(clean, level, generator=torch.Generator().manual_seed(1))
    residual = noisy - math.sqrt(_reference_alpha_bar(level)) * clean
    sigma = math.sqrt(1 - _reference_alpha_bar(level))
    assert float(residual.mean()) == pytest.approx(0.0, abs=4 * sigma / math.sqrt(residual.numel()))
    assert float(residual.std()) == pytest.approx(sigma, rel=0.02)
    # the noise is the generator's standard normal draw, scaled
    expected_noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(residual, sigma * expected_noise, atol=1e-5, rtol=0)


def test_add_noise_is_reproducible_by_generator():
    clean = torch.zeros(2, 3, 8, 8)
    first = images.add_noise(clean, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, images.add_noise(clean, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(first, images.add_noise(clean, generator=torch.Generator().manual_seed(4)))


def test_add_noise_rejects_bad_input():
    with pytest.raises(ValueError, match=r"batch × channels × height × width, got shape \(3, 8, 8\)"):
        images.add_noise(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="NaN"):
        images.add_noise(torch.full((1, 3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        images.add_noise(torch.zeros(1, 3, 4, 4), level=0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        images.add_noise(torch.zeros(1, 3, 4, 4), level=1.5)
    with pytest.raises(TypeError, match="floating-point"):
        images.add_noise(torch.zeros(1, 3, 4, 4, dtype=torch.long))


def test_collator_pairs_fresh_noise_with_the_clean_labels(splits):
    examples = [splits["train"][index] for index in range(4)]
    collate = images.NoisyImageCollator(level=0.2, seed=5)
    first, second = collate(examples), collate(examples)
    clean = torch.stack([example["pixel_values"] for example in examples])
    assert set(first) == {"pixel_values", "labels"}
    assert torch.equal(first["labels"], clean)
    assert not torch.equal(first["pixel_values"], second["pixel_values"])  # fresh noise each batch
    torch.testing.assert_close(first["pixel_values"], images.NoisyImageCollator(level=0.2, seed=5)(examples)[
        "pixel_values"])
    with pytest.raises(ValueError, match="noise level"):
        images.NoisyImageCollator(level=-1)


# ----------------------------------------------------------------------------------------------------- metrics


def _numpy_psnr(pred: np.ndarray, clean: np.ndarray) -> np.ndarray:
    pred = np.clip((pred.astype(np.float64) + 1) / 2 * 255, 0, 255)
    clean = np.clip((clean.astype(np.float64) + 1) / 2 * 255, 0, 255)
    errors = ((pred - clean) ** 2).reshape(len(pred), -1).mean(axis=1)
    return 10 * np.log10(255.0**2 / errors), errors / 255.0**2


def test_psnr_and_mse_against_numpy():
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(5, 3, 8, 8, generator=generator) * 2 - 1
    pred = clean + 0.3 * torch.randn(clean.shape, generator=generator)  # some pixels leave [-1, 1]: clamped
    per_image, errors = _numpy_psnr(pred.numpy(), clean.numpy())
    np.testing.assert_allclose(images.psnr(pred, clean, reduction="none").numpy(), per_image, rtol=1e-5)
    np.testing.assert_allclose(images.mse(pred, clean, reduction="none").numpy(), errors, rtol=1e-5)
    assert float(images.mse(pred, clean)) == pytest.approx(errors.mean(), rel=1e-5)
    assert float(images.psnr(pred, clean)) == pytest.approx(-10 * np.log10(errors.mean()), rel=1e-5)
    assert float(images.psnr(clean, clean)) == math.inf


def test_psnr_of_constant_offset_is_known():
    clean = torch.zeros(2, 1, 4, 4)
    # an offset of 0.2 in [-1, 1] is 0.1 in [0, 1]: mse 0.01, PSNR 20 dB
    assert float(images.psnr(clean + 0.2, clean)) == pytest.approx(20.0, abs=1e-4)


def test_metrics_reject_mismatched_or_bad_input():
    with pytest.raises(ValueError, match=r"same shape, got \(2, 3, 8, 8\) and \(2, 3, 8, 4\)"):
        images.psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 4))
    with pytest.raises(ValueError, match="pred contains NaN"):
        images.mse(torch.full((1, 3, 2, 2), float("nan")), torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="reduction must be"):
        images.mse(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), reduction="sum")


# ----------------------------------------------------------------------------------------------------- picture


def test_image_grid_lays_out_rows_and_columns(tmp_path):
    clean = torch.ones(3, 3, 8, 8) * torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1)  # pure red
    path = images.save_image_grid({"noisy": -clean, "clean": clean}, tmp_path / "grid.png", zoom=2, padding=2,
                                  label_width=10)
    picture = np.asarray(Image.open(path))
    assert picture.shape == (2 + 2 * (16 + 2), 10 + 3 * (16 + 2) + 2, 3)
    top_of_second_row, left_of_first_column = 2 + 18, 10 + 2
    assert tuple(picture[top_of_second_row + 5, left_of_first_column + 5]) == (255, 0, 0)
    with pytest.raises(ValueError, match="same shape"):
        images.save_image_grid({"a": clean, "b": clean[:2]}, tmp_path / "bad.png")
