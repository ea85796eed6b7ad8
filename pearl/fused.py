"""What passes between the fusion, the refiners and the decision: a prepared image with its windows,
and query logits at the original size held as the smaller tensor they are resized from.

One definition for the Segmentor, the refiners (``pearl.refine``) and the benchmark's per-window
loop; the memory budgets that decide when logits are processed in slabs live here too
(docs/memory.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .preprocess import Window

FULL_SIZE_BUDGET = 2 ** 28  # query × pixel values held at once at the original size (1 GiB in fp32)
SLAB_VALUES = 2 ** 24        # query × pixel values per slab above that budget


def fits_whole(values: int) -> bool:
    """Whether ``values`` query × pixel values may exist at once (``FULL_SIZE_BUDGET``)."""
    return values <= FULL_SIZE_BUDGET


def per_slab(values_per_unit: int) -> int:
    """How many units (queries, columns, windows) of ``values_per_unit`` values each make one slab (≥ 1)."""
    return max(1, SLAB_VALUES // values_per_unit)


def upsample(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of [C, h, w] to ``size`` (align_corners=False), as mmseg's ``resize``."""
    return F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]


@dataclass
class WindowedImage:
    """An image on the device: its normalised input, the original size and the windows cut from it."""

    input: torch.Tensor          # [3, H', W'] normalised, on device
    ori_shape: tuple[int, int]
    windows: list[Window]

    def guide(self) -> torch.Tensor:
        """[1, 3, H, W]: the input bilinearly resized to the original size (fp32), the refiners' guide."""
        return upsample(self.input.float(), self.ori_shape)[None]


@dataclass
class OriginalSizeLogits:
    """Query logits at the original size [Q, H, W], held as the tensor ``source`` [Q, h, w] they are
    bilinearly upsampled from (then cast to ``dtype``), so that they never have to exist whole."""

    source: torch.Tensor
    size: tuple[int, int]
    dtype: torch.dtype

    @property
    def values(self) -> int:
        return self.source.shape[0] * self.size[0] * self.size[1]

    @property
    def resized(self) -> bool:
        """Whether ``source`` is smaller than the original size (then ``full`` resizes it)."""
        return tuple(self.source.shape[1:]) != tuple(self.size)

    def full(self, queries: slice = slice(None)) -> torch.Tensor:
        source = self.source[queries]
        if self.resized:
            source = upsample(source, self.size)
        return source.to(self.dtype)

    def column_slabs(self, width: int):
        """(first column, [Q, H, width] logits) for consecutive column slabs.

        The bilinear kernel interpolates along the width first; that pass runs once over the whole
        width, the pass along the height per slab (fp32 logits: the full resize's values)."""
        height, full_width = self.size
        resized = self.resized
        across = (F.interpolate(self.source.float(), size=full_width, mode="linear", align_corners=False)
                  if resized else self.source)
        for start in range(0, full_width, width):
            slab = across[:, :, start:start + width]
            if resized:
                slab = F.interpolate(slab.transpose(1, 2), size=height, mode="linear",
                                     align_corners=False).transpose(1, 2)
            yield start, slab.to(self.dtype)
