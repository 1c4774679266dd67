"""Images for the denoising task: crops of scikit-image's sample photos, the reference's corruption, PSNR and MSE.

Data. The photos are the colour sample images that ship inside the scikit-image wheel (``skimage/data/*.png|jpg``),
so nothing is downloaded at run time: :data:`PHOTOS` lists them and the ``skimage.data`` function that reads each.
The other sample images were left out on purpose: ``brain``, ``eagle``, ``lily``, ``kidney``, ``skin`` and friends
are fetched with ``pooch`` on first use (they fail without network); ``cat`` is ``chelsea`` again; ``camera``,
``moon``, ``coins`` ... are greyscale; ``colorwheel`` and ``logo`` are synthetic; ``retina`` and
``hubble_deep_field`` are mostly black background (their crops would be near-constant and easy to denoise); of the
stereo pair only the left motorcycle is kept (the right one shows the same scene). scikit-learn's ``load_digits``
(8×8 greyscale, 17 grey levels) also ships in its wheel, but is too small and too coarse to show what a denoiser
does to texture and edges.

Each photo is downscaled (anti-aliased, ``scale``, default 0.5) so that a crop holds a recognisable piece of an
object rather than a patch of texture, then cut into ``size``×``size`` RGB crops on a regular grid (``stride``,
default ``size // 2``), row by row: the crops are a deterministic function of the arguments, no randomness.

Split. By source photo, never by crop: overlapping crops of one photo share pixels, so a split by crop would put
pieces of the training pixels into validation. :data:`VALIDATION_PHOTOS` (``coffee``) gives validation crops from a
photo the models never see in training; the other five photos are for training.

Range. Images are float32 tensors ``batch × channels × height × width`` in [-1, 1] (``2 * x - 1`` for ``x`` in
[0, 1]), the range diffusion models are trained in.

Corruption (:func:`add_noise`). The reference (alexiglad/EBT, model/img/ebt_denoise.py and dit_denoise.py) corrupts
with the forward diffusion's ``q_sample``, ``x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε``, ε ~ N(0, I), on a linear beta
schedule of ``T = int(diffusion_steps / level)`` steps (``diffusion_steps`` is 100 in its scripts) whose betas run
from ``1e-4·1000/T`` to ``0.02·1000/T`` (Ho et al.'s schedule stretched to T steps), at ``t = diffusion_steps − 1``.
A "noise level" is therefore the fraction of a diffusion trajectory, not a standard deviation. In σ terms
(:func:`noise_std`, :func:`signal_scale`, in [-1, 1] units; halve σ for [0, 1] units):

======  =====  ==============  ==============  ==========
level   T      sqrt(ᾱ) signal  σ = sqrt(1−ᾱ)   σ/sqrt(ᾱ)
======  =====  ==============  ==============  ==========
0.1     1000   0.947           0.321           0.339
0.2     500    0.812           0.583           0.718
0.3     333    0.629           0.777           1.235
======  =====  ==============  ==============  ==========

The reference's evaluation (inference/img/generate_image.py) uses ``t = int(level·T) − 1`` instead, which is the
same step (99) at levels 0.1 and 0.2 and one step earlier (98) at 0.3 (``int(0.3·333) = 99``); this module follows
the training code (``t = diffusion_steps − 1``) at every level.

Metrics. :func:`mse` and :func:`psnr` are computed in [0, 1] units after clamping both images to the valid range,
as the reference does (it maps to [0, 255], clamps and uses a peak of 255, which gives the same PSNR); with
``reduction="mean"`` the PSNR is that of the mean squared error over the batch, as the reference logs it, not the
mean of per-image PSNRs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import numpy as np
import torch

__all__ = [
    "DEFAULT_CROP_SIZE",
    "DEFAULT_NOISE_LEVEL",
    "PHOTOS",
    "TRAIN_PHOTOS",
    "VALIDATION_PHOTOS",
    "NoisyImageCollator",
    "add_noise",
    "image_crops",
    "load_denoising_splits",
    "load_photo",
    "mse",
    "noise_alpha_bar",
    "noise_std",
    "psnr",
    "reference_alphas_cumprod",
    "save_image_grid",
    "signal_scale",
]

DEFAULT_CROP_SIZE = 32
DEFAULT_NOISE_LEVEL = 0.2  # the reference's inference scripts (job_scripts/img/inference/*_denoising.sh)
DEFAULT_DIFFUSION_STEPS = 100  # the reference's --diffusion_steps in every image script


def _stereo_left(data):
    return data.stereo_motorcycle()[0]


# name -> reader of the photo as an H×W×3 uint8 array (a function of the skimage.data module)
PHOTOS: dict[str, Callable] = {
    "astronaut": lambda data: data.astronaut(),  # 512×512, portrait with a flag and a spacecraft
    "chelsea": lambda data: data.chelsea(),  # 300×451, a cat
    "coffee": lambda data: data.coffee(),  # 400×600, a cup of coffee on a table
    "immunohistochemistry": lambda data: data.immunohistochemistry(),  # 512×512, stained tissue
    "motorcycle": _stereo_left,  # 500×741, a motorcycle in a workshop (left view of the stereo pair)
    "rocket": lambda data: data.rocket(),  # 427×640, a rocket on its launch pad
}
VALIDATION_PHOTOS = ("coffee",)
TRAIN_PHOTOS = tuple(name for name in PHOTOS if name not in VALIDATION_PHOTOS)


# ------------------------------------------------------------------------------------------------------ photos


def load_photo(name: str, scale: float = 0.5) -> np.ndarray:
    """One of :data:`PHOTOS`, downscaled by ``scale`` (anti-aliased), as a float32 H×W×3 array in [0, 1]."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; the photos are {sorted(PHOTOS)}")
    if not (isinstance(scale, (int, float)) and 0 < scale <= 1):
        raise ValueError(f"scale must be a number in (0, 1], got {scale!r}")
    import skimage.data
    import skimage.transform

    try:
        photo = np.asarray(PHOTOS[name](skimage.data))
    except ModuleNotFoundError as error:  # skimage asks for pooch when the file is not in the wheel
        message = f"scikit-image did not find the sample photo {name!r} in its installation: {error}"
        raise RuntimeError(message) from error
    if photo.ndim != 3 or photo.shape[-1] != 3 or photo.dtype != np.uint8:
        raise RuntimeError(f"photo {name!r} is {photo.shape} {photo.dtype}, expected H×W×3 uint8")
    photo = photo.astype(np.float64) / 255.0
    if scale != 1:
        photo = skimage.transform.rescale(photo, scale, channel_axis=-1, anti_aliasing=True, order=1)
    return np.clip(photo, 0.0, 1.0).astype(np.float32)


def _grid_positions(length: int, size: int, stride: int) -> range:
    return range(0, length - size + 1, stride)


def image_crops(
    photos: Sequence[str], size: int = DEFAULT_CROP_SIZE, stride: int | None = None, scale: float = 0.5
) -> datasets.Dataset:
    """The ``size``×``size`` crops of ``photos`` on a grid of step ``stride`` (default ``size // 2``).

    Columns: ``pixel_values`` (float32 3×size×size in [-1, 1], torch format), ``source`` (the photo's name), ``top``
    and ``left`` (the crop's corner in the downscaled photo). Photo by photo, row by row.
    """
    if not (isinstance(size, int) and size >= 2):
        raise ValueError(f"size must be an integer >= 2, got {size!r}")
    stride = size // 2 if stride is None else stride
    if not (isinstance(stride, int) and stride >= 1):
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if isinstance(photos, str) or not photos:
        raise ValueError(f"photos must be a non-empty list of names from {sorted(PHOTOS)}, got {photos!r}")
    crops, sources, tops, lefts = [], [], [], []
    for name in photos:
        photo = load_photo(name, scale)
        height, width, _ = photo.shape
        if height < size or width < size:
            raise ValueError(f"photo {name!r} is {height}×{width} at scale {scale}, smaller than a {size}-pixel crop")
        for top in _grid_positions(height, size, stride):
            for left in _grid_positions(width, size, stride):
                crops.append(photo[top : top + size, left : left + size].transpose(2, 0, 1))
                sources.append(name)
                tops.append(top)
                lefts.append(left)
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=(3, size, size), dtype="float32"),
            "source": datasets.Value("string"),
            "top": datasets.Value("int32"),
            "left": datasets.Value("int32"),
        }
    )
    pixels = np.stack(crops) * 2.0 - 1.0
    table = {"pixel_values": pixels.astype(np.float32), "source": sources, "top": tops, "left": lefts}
    return datasets.Dataset.from_dict(table, features=features).with_format("torch")


def load_denoising_splits(
    size: int = DEFAULT_CROP_SIZE, stride: int | None = None, scale: float = 0.5
) -> datasets.DatasetDict:
    """``{"train": crops of TRAIN_PHOTOS, "validation": crops of VALIDATION_PHOTOS}`` (see :func:`image_crops`)."""
    return datasets.DatasetDict(
        train=image_crops(TRAIN_PHOTOS, size, stride, scale),
        validation=image_crops(VALIDATION_PHOTOS, size, stride, scale),
    )


# -------------------------------------------------------------------------------------------------- corruption


def _check_level(level: float, diffusion_steps: int) -> None:
    if not (isinstance(diffusion_steps, int) and diffusion_steps >= 1):
        raise ValueError(f"diffusion_steps must be a positive integer, got {diffusion_steps!r}")
    if not (isinstance(level, (int, float)) and not isinstance(level, bool) and math.isfinite(level)):
        raise ValueError(f"the noise level must be a number in (0, 1], got {level!r}")
    if not 0 < level <= 1:
        raise ValueError(f"the noise level must be in (0, 1] (a fraction of the diffusion trajectory), got {level}")


def reference_alphas_cumprod(level: float = DEFAULT_NOISE_LEVEL, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS):
    """ᾱ_t for t = 0..T−1 of the reference's schedule at ``level``: T = int(diffusion_steps / level), linear betas
    from 1e-4·1000/T to 0.02·1000/T (float64, as the reference computes them)."""
    _check_level(level, diffusion_steps)
    num_steps = int(diffusion_steps / level)
    stretch = 1000.0 / num_steps
    betas = np.linspace(1e-4 * stretch, 0.02 * stretch, num_steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def noise_alpha_bar(level: float = DEFAULT_NOISE_LEVEL, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS) -> float:
    """ᾱ at the step the reference noises to (t = diffusion_steps − 1)."""
    return float(reference_alphas_cumprod(level, diffusion_steps)[diffusion_steps - 1])


def noise_std(level: float = DEFAULT_NOISE_LEVEL, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS) -> float:
    """σ = sqrt(1 − ᾱ): the standard deviation of the added noise, in [-1, 1] units."""
    return math.sqrt(1.0 - noise_alpha_bar(level, diffusion_steps))


def signal_scale(level: float = DEFAULT_NOISE_LEVEL, diffusion_steps: int = DEFAULT_DIFFUSION_STEPS) -> float:
    """sqrt(ᾱ): the factor the clean image is shrunk by."""
    return math.sqrt(noise_alpha_bar(level, diffusion_steps))


def _check_images(images: torch.Tensor, what: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{what} must be batch × channels × height × width, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor in [-1, 1], got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what} contains NaN or infinite values")


def add_noise(
    clean: torch.Tensor,
    level: float = DEFAULT_NOISE_LEVEL,
    generator: torch.Generator | None = None,
    diffusion_steps: int = DEFAULT_DIFFUSION_STEPS,
) -> torch.Tensor:
    """The reference's corruption: ``sqrt(ᾱ)·clean + sqrt(1 − ᾱ)·ε`` with ε ~ N(0, I) drawn from ``generator``.

    ``level`` 0.2 (the default) is σ = 0.583 and a signal scale of 0.812 (see the module docstring's table).
    """
    _check_images(clean, "clean")
    alpha_bar = noise_alpha_bar(level, diffusion_steps)
    noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=clean.device)
    return math.sqrt(alpha_bar) * clean + math.sqrt(1.0 - alpha_bar) * noise


@dataclasses.dataclass
class NoisyImageCollator:
    """Batches clean crops into ``{"pixel_values": noisy, "labels": clean}`` with fresh noise at ``level``.

    For the ``Trainer``: each call draws new noise from its own generator (seeded with ``seed``), so a training run
    is reproducible; examples are dicts with ``pixel_values`` (other columns are dropped).
    """

    level: float = DEFAULT_NOISE_LEVEL
    seed: int = 0
    diffusion_steps: int = DEFAULT_DIFFUSION_STEPS

    def __post_init__(self):
        _check_level(self.level, self.diffusion_steps)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        clean = torch.stack([torch.as_tensor(example["pixel_values"], dtype=torch.float32) for example in examples])
        noisy = add_noise(clean, self.level, self.generator, self.diffusion_steps)
        return {"pixel_values": noisy, "labels": clean}


# ----------------------------------------------------------------------------------------------------- metrics


def _unit_range_pair(pred: torch.Tensor, clean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_images(pred, "pred")
    _check_images(clean, "clean")
    if pred.shape != clean.shape:
        raise ValueError(f"pred and clean must have the same shape, got {tuple(pred.shape)} and {tuple(clean.shape)}")
    to_unit = lambda images: ((images.detach().double() + 1.0) / 2.0).clamp(0.0, 1.0)  # noqa: E731
    return to_unit(pred), to_unit(clean)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def mse(pred: torch.Tensor, clean: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error in [0, 1] units after clamping both to range: per image (``"none"``) or over the batch."""
    pred, clean = _unit_range_pair(pred, clean)
    return _reduce(((pred - clean) ** 2).flatten(1).mean(dim=1), reduction).float()


def psnr(pred: torch.Tensor, clean: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, peak 1 in [0, 1] units: ``-10·log10(mse)``.

    ``"none"``: one value per image; ``"mean"``: the PSNR of the batch's mean squared error (the reference's).
    Identical images give ``inf``.
    """
    error = mse(pred, clean, reduction).double()
    return (-10.0 * torch.log10(error)).float()


# ------------------------------------------------------------------------------------------------------ pictures


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    unit = ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
    return (unit * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(
    rows: dict[str, torch.Tensor], path: str | Path, zoom: int = 4, padding: int = 2, label_width: int = 64
) -> Path:
    """A PNG with one row per entry of ``rows`` (label → B×C×H×W images in [-1, 1]), one column per image.

    Pixels are enlarged ``zoom`` times (nearest neighbour) so that small crops stay readable; labels on the left.
    """
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("rows must name at least one batch of images")
    shapes = {label: tuple(images.shape) for label, images in rows.items()}
    for label, images in rows.items():
        _check_images(images, f"rows[{label!r}]")
    if len(set(shapes.values())) != 1:
        raise ValueError(f"every row must have the same shape, got {shapes}")
    batch, channels, height, width = next(iter(shapes.values()))
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    cell_h, cell_w = height * zoom + padding, width * zoom + padding
    canvas = Image.new("RGB", (label_width + batch * cell_w + padding, len(rows) * cell_h + padding), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (label, images) in enumerate(rows.items()):
        top = padding + row * cell_h
        draw.text((4, top + height * zoom // 2 - 5), label, fill="black")
        for column, pixels in enumerate(_to_uint8(images)):
            tile = Image.fromarray(pixels[..., 0] if channels == 1 else pixels).convert("RGB")
            tile = tile.resize((width * zoom, height * zoom), Image.NEAREST)
            canvas.paste(tile, (label_width + padding + column * cell_w, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
