"""The image processor of `EBTForImageDenoising`: pictures in, pixel values in [-1, 1] out, patches and back.

`EBTImageProcessor` is a `transformers` image processor on the portable PIL/NumPy backend (no torchvision needed):
resize to the model's square size, rescale to [0, 1], normalise with mean 0.5 and std 0.5 to [-1, 1] (the range
the model and `modeling_ebt.images` work in), and `postprocess` back to 8-bit pictures. It saves and loads as
`preprocessor_config.json` beside the model (`save_pretrained` / `AutoImageProcessor.from_pretrained`).

`patchify` / `unpatchify` turn images into the sequence of flattened patches the transformer reads and back; the
model uses the same two functions, so that the processor's patches are the model's tokens.
"""

import numpy as np
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling
from transformers.processing_utils import ImagesKwargs


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """batch × channels × height × width → batch × patches × (channels · patch_size²), patches in row-major order,
    each flattened channel first."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"images of {height}×{width} pixels do not split into patches of {patch_size}×{patch_size}")
    rows, cols = height // patch_size, width // patch_size
    grid = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, channels * patch_size**2)


def unpatchify(patches: torch.Tensor, patch_size: int, num_channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `patchify`: batch × patches × (channels · patch_size²) → batch × channels × height × width."""
    batch = patches.shape[0]
    rows, cols = height // patch_size, width // patch_size
    if patches.shape[1:] != (rows * cols, num_channels * patch_size**2):
        raise ValueError(f"patches of shape {tuple(patches.shape)} are not the {rows * cols} patches of "
                         f"{num_channels}×{patch_size}×{patch_size} values of a {height}×{width} image")
    grid = patches.reshape(batch, rows, cols, num_channels, patch_size, patch_size)
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(batch, num_channels, height, width)


class EBTImageProcessorKwargs(ImagesKwargs, total=False):
    """patch_size: the side of the model's square patches (for `patchify`)."""

    patch_size: int


class EBTImageProcessor(PilBackend):
    """Resize (bilinear) to `size`, rescale by 1/255, normalise to [-1, 1]; `patchify`, `unpatchify` and
    `postprocess` (back to uint8 pictures). `for_config(config)` gives the processor of an `EBTVisionConfig`."""

    valid_kwargs = EBTImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    size = {"height": 32, "width": 32}
    do_resize = True
    do_rescale = True
    do_normalize = True
    image_mean = IMAGENET_STANDARD_MEAN  # 0.5: (x / 255 − 0.5) / 0.5 lies in [-1, 1]
    image_std = IMAGENET_STANDARD_STD
    patch_size = 4

    @classmethod
    def for_config(cls, config) -> "EBTImageProcessor":
        """The processor that feeds a model of `config` (an EBTVisionConfig): its image size, channels and patches."""
        channels = config.num_channels
        return cls(size={"height": config.image_size, "width": config.image_size}, patch_size=config.patch_size,
                   image_mean=[0.5] * channels, image_std=[0.5] * channels, do_convert_rgb=channels == 3)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return patchify(pixel_values, self.patch_size)

    def unpatchify(self, patches: torch.Tensor, num_channels: int | None = None) -> torch.Tensor:
        channels = num_channels if num_channels is not None else len(self.image_mean)
        return unpatchify(patches, self.patch_size, channels, self.size.height, self.size.width)

    def postprocess(self, pixel_values: torch.Tensor) -> np.ndarray:
        """batch × channels × height × width values in [-1, 1] (clipped) → batch × height × width × channels uint8."""
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        unit = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
        return (unit * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


EBTImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["EBTImageProcessor", "patchify", "unpatchify"]
