"""Image-side preprocessing: keep-ratio rescale, normalisation, window placement.

Follows docs/protocol.md §2, §3 and §6.2 (MMCV ``imrescale`` and MMSeg ``slide_inference``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch
from PIL import Image

from .errors import ImageSizeError
from .params import default

# OpenAI CLIP mean/std on the 0-255 scale, RGB order, as the released configs write them (docs/protocol.md §3).
CLIP_MEAN = (122.771, 116.746, 104.094)
CLIP_STD = (68.501, 66.632, 70.323)


class Normalisation(NamedTuple):
    """Per-channel (RGB) mean and std on the 0–255 scale."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def columns(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as fp32 [3, 1, 1] tensors on ``device``."""
        return tuple(torch.tensor(values, dtype=torch.float32, device=device).view(3, 1, 1)
                     for values in (self.mean, self.std))

    def normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        """(x − mean) / std of RGB pixels [..., 3, H, W] on the 0–255 scale."""
        mean, std = self.columns(pixels.device)
        return (pixels - mean) / std

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """fp32 RGB on the 0–255 scale of images [..., 3, H, W] normalised with these statistics."""
        mean, std = self.columns(images.device)
        return images.float() * std + mean

    def unnormalised(self, images: torch.Tensor) -> torch.Tensor:
        """fp32 RGB in [0, 1] of images [..., 3, H, W] normalised with these statistics."""
        return self.pixels(images) / 255


OPENAI_NORMALISATION = Normalisation(CLIP_MEAN, CLIP_STD)


def model_normalisation(visual) -> Normalisation:
    """The image tower's own mean/std: what open_clip sets from the pretrained config
    (``visual.image_mean`` / ``image_std``, on the 0–1 scale; 0.5/0.5 for some LAION tags), times
    255. Where they are OpenAI's (every OpenAI tag, and open_clip's default), the released
    configs' rounded constants (``CLIP_MEAN``, ``CLIP_STD``), so the released pipelines' inputs
    are reproduced bit for bit; a tower that states none is normalised as OpenAI's."""
    mean, std = getattr(visual, "image_mean", None), getattr(visual, "image_std", None)
    if mean is None or std is None:
        return OPENAI_NORMALISATION
    scaled = Normalisation(tuple(255 * float(v) for v in mean), tuple(255 * float(v) for v in std))
    openai = all(abs(a - b) < 1e-3 for a, b in zip(scaled.mean + scaled.std, CLIP_MEAN + CLIP_STD))
    return OPENAI_NORMALISATION if openai else scaled


@dataclass(frozen=True)
class WindowConfig:
    """Rescale and window placement (docs/protocol.md §2, §6.2); the parameters of the same names."""

    resize_short: int = default("resize_short")
    resize_long: int = default("resize_long")
    slide_crop: int = default("slide_crop")
    slide_stride: int = default("slide_stride")


class Window(NamedTuple):
    y1: int
    y2: int
    x1: int
    x2: int


def to_rgb_uint8(image) -> np.ndarray:
    """H×W×3 uint8 RGB from a PIL image or an array (grey H×W, H×W×1, RGB, or RGBA: alpha dropped).

    Float arrays must already lie in [0, 255]; anything else raises ValueError.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image of shape {array.shape} is not H×W, H×W×3 or H×W×4; pass an RGB image")
    array = array[:, :, :3]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("float image values must lie in [0, 255]; convert the image to uint8 RGB")
        array = np.clip(np.round(array), 0, 255).astype(np.uint8) if np.issubdtype(array.dtype, np.floating) \
            else array.astype(np.uint8)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image of shape {array.shape} is empty")
    return np.ascontiguousarray(array)


def rescaled_size(height: int, width: int, short: int, long: int = 2048) -> tuple[int, int]:
    """(H', W') of MMCV ``imrescale(scale=(long, short))``: f = min(long/max, short/min), int(x·f + 0.5)."""
    if short <= 0:
        return height, width
    factor = min(long / max(height, width), short / min(height, width))
    size = int(height * factor + 0.5), int(width * factor + 0.5)
    if min(size) < 1:
        raise ImageSizeError(f"an image of {width}×{height} pixels rescales to {size[1]}×{size[0]} "
                             f"(resize_short={short}, resize_long={long}): too thin to segment")
    return size


def rescale(image: np.ndarray, short: int, long: int = 2048) -> np.ndarray:
    """Keep-ratio bilinear (cv2 INTER_LINEAR, no antialias) resize of an H×W×3 uint8 image."""
    new_h, new_w = rescaled_size(image.shape[0], image.shape[1], short, long)
    if (new_h, new_w) == image.shape[:2]:
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def normalise(image: np.ndarray, normalisation: Normalisation = OPENAI_NORMALISATION) -> torch.Tensor:
    """[3, H, W] float32 from an H×W×3 uint8 RGB image, (x − mean) / std on the 0–255 scale."""
    return normalisation.normalised(torch.from_numpy(image).permute(2, 0, 1).float())


class PreparedImage(NamedTuple):
    """An image ready for the device: ``input`` [3, H', W'] float32, rescaled and normalised, and
    the original (H, W) the prediction is made at."""

    input: torch.Tensor
    original_size: tuple[int, int]


def prepare_image(image, config: WindowConfig, normalisation: Normalisation = OPENAI_NORMALISATION
                  ) -> PreparedImage:
    """The CPU half of preprocessing (RGB conversion, keep-ratio rescale, normalisation by the
    model's mean/std): a pure function of its arguments, so data-loader workers can run it."""
    rgb = to_rgb_uint8(image)
    return PreparedImage(normalise(rescale(rgb, config.resize_short, config.resize_long), normalisation),
                         rgb.shape[:2])


def window_starts(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of the MMSeg windows along one axis; the last one is snapped to the border."""
    count = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(count):
        end = min(i * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[Window]:
    """Windows in MMSeg order (row-major); ``crop <= 0`` gives one whole-image window."""
    if crop <= 0:
        return [Window(0, height, 0, width)]
    if stride <= 0:
        raise ValueError(f"slide_stride must be positive, got {stride}")
    return [Window(y1, y2, x1, x2)
            for y1, y2 in window_starts(height, crop, stride)
            for x1, x2 in window_starts(width, crop, stride)]
