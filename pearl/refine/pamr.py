"""PAMR (pixel-adaptive mask refinement) as NACLIP applies it after fusion.

docs/methods.md §4.1, after sinahmr/NACLIP@0cac3a6 ``pamr.py`` (from visinf/1-stage-wseg) and
``naclip.py`` ``predict``. fp32; image [B, 3, H, W] normalised RGB, logits [B, Q, H, W].
``PAMRRefiner`` is PAMR as a registered refiner; it always refines the whole original-size logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..fused import OriginalSizeLogits, WindowedImage
from ..params import default
from . import register
from .base import Guide, Refiner

_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def _taps(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """[B, C, 9, H, W]: the 3×3 dilated neighbourhood (centre included) with replicate padding."""
    height, width = x.shape[-2:]
    padded = F.pad(x, [dilation] * 4, mode="replicate")
    return torch.stack([padded[..., dilation + dy * dilation: dilation + dy * dilation + height,
                               dilation + dx * dilation: dilation + dx * dilation + width]
                        for dy, dx in _OFFSETS], dim=2)


def _without_centre(taps: torch.Tensor) -> torch.Tensor:
    return torch.cat([taps[:, :, :4], taps[:, :, 5:]], dim=2)


def pamr_affinity(image: torch.Tensor, dilations: Sequence[int] = (8, 16)) -> torch.Tensor:
    """[B, 1, 8·len(dilations), H, W] softmax weights over the dilated neighbours."""
    taps = [_taps(image, d) for d in dilations]
    sigma = torch.cat(taps, dim=2).std(dim=2, keepdim=True)  # 18 samples, unbiased
    diffs = torch.cat([_without_centre(t) for t in taps], dim=2) - image[:, :, None]
    affinity = -(diffs.abs() / (1e-8 + 0.1 * sigma)).mean(dim=1, keepdim=True)
    return torch.softmax(affinity, dim=2)


@dataclass(frozen=True)
class PAMRConfig:
    """PAMR's settings: the parameters ``pamr_iters``, ``pamr_dilations`` (pearl.params)."""

    iters: int = default("pamr_iters")
    dilations: tuple[int, ...] = default("pamr_dilations")


def pamr(image: torch.Tensor, logits: torch.Tensor, iters: int = 10, dilations: Sequence[int] = (8, 16),
         queries_per_slab: int | None = None) -> torch.Tensor:
    """Refined logits [B, Q, H, W]: ``iters`` rounds of L(i) ← Σ_n w_n(i)·L(i + δ_n).

    Each query is propagated on its own with the image's weights, so ``queries_per_slab`` (None: all
    at once) bounds the neighbour taps held, 8·len(dilations) per value, without changing a value."""
    weights = pamr_affinity(image.float(), dilations)
    step = queries_per_slab or logits.shape[1]
    return torch.cat([_propagate(logits[:, first:first + step].float(), weights, iters, dilations)
                      for first in range(0, logits.shape[1], step)], dim=1)


def _propagate(out: torch.Tensor, weights: torch.Tensor, iters: int, dilations: Sequence[int]) -> torch.Tensor:
    """``iters`` rounds of Σ_n w_n ⊙ shift_n(out), the neighbours in ``pamr_affinity``'s order,
    accumulated one at a time: 20× faster on a CPU than stacking the 16 shifted copies, and equal to
    it up to the order of the float additions (about 1e−6)."""
    height, width = out.shape[-2:]
    weights = weights[:, 0]  # [B, 8·len(dilations), H, W]
    neighbours = [(d, dy, dx) for d in dilations for dy, dx in _OFFSETS if (dy, dx) != (0, 0)]
    for _ in range(iters):
        padded = {d: F.pad(out, [d] * 4, mode="replicate") for d in dilations}
        total = torch.zeros_like(out)
        for index, (d, dy, dx) in enumerate(neighbours):
            shifted = padded[d][..., d + dy * d: d + dy * d + height, d + dx * d: d + dx * d + width]
            total.addcmul_(shifted, weights[:, index:index + 1])
        out = total
    return out


@register
class PAMRRefiner(Refiner):
    name = "pamr"
    Config = PAMRConfig
    config_prefix = "pamr_"
    order = 10  # as NACLIP applies it: on the fused logits, before any other refinement

    def refine(self, item: WindowedImage, logits: OriginalSizeLogits, guide: Guide, info: dict
               ) -> OriginalSizeLogits:
        refined = pamr(guide(), logits.full()[None], self.config.iters, self.config.dilations)[0]
        return OriginalSizeLogits(refined.to(self.context.dtype), item.ori_shape, self.context.dtype)

