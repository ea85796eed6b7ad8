"""LPOSS+: label propagation over the pixels of the fused logits, on the image's colours.

vladan-stojnic/LPOSS@e489a74 ``segmentation/evaluation/lposs_eval.py`` under ``pixel_refine``
(``get_pixel_connections``, ``get_lposs_plus_laplacian``, ``perform_lp``), docs/methods.md §12.1. At
the input size (the rescaled image the windows were cut from; a whole-image prediction is first
resized to it), each pixel is joined to every other pixel of its r×r neighbourhood by exp(−‖Δ Lab‖/τ),
CIE Lab (kornia's ``rgb_to_lab``) divided by (100, 128, 128); the graph is normalised symmetrically
and (I − α·Wn)⁻¹Y solved by conjugate gradients per query (``pearl.propagation``). The graph is a fixed
stencil, so Wn's product is a sum of shifted images instead of a sparse matrix of 168 entries a pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch

from ..fused import OriginalSizeLogits, WindowedImage, fits_whole, per_slab, upsample
from ..params import default
from ..propagation import propagate
from . import register
from .base import Guide, Refiner

CG_TOLERANCE = 1e-6  # lposs_eval.py dfs_search's tol
LAB_SCALE = (100.0, 128.0, 128.0)  # get_pixel_connections: "project Lab values to 0-1 range"


@dataclass(frozen=True)
class LPOSSPlusConfig:
    window: int = default("lposs_plus_window")
    tau: float = default("lposs_plus_tau")
    alpha: float = default("lposs_plus_alpha")
    iters: int = default("lposs_plus_iters")


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[3, H, W] CIE Lab (D65, L in [0, 100]) of sRGB in [0, 1] [3, H, W], as kornia's ``rgb_to_lab``:
    the sRGB curve undone, XYZ by the sRGB matrix, divided by the white point, the cube root above
    0.008856 and 7.787·t + 4/29 below it."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    to_xyz = torch.tensor([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                           [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,jhw->ihw", to_xyz, linear) / white[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1 / 3), 7.787 * xyz + 4 / 29)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def neighbour_offsets(window: int) -> list[tuple[int, int]]:
    """(dy, dx) of every other pixel of a window × window neighbourhood (radius window // 2)."""
    radius = window // 2
    return [move for move in product(range(-radius, radius + 1), repeat=2) if move != (0, 0)]


def _overlap(offset: int, size: int) -> tuple[slice, slice]:
    """(pixels p, their neighbours p + offset) along one axis, both inside [0, size)."""
    return slice(max(0, -offset), size - max(0, offset)), slice(max(0, offset), size + min(0, offset))


def normalised_stencil(lab: torch.Tensor, offsets: list[tuple[int, int]], tau: float) -> torch.Tensor:
    """[O, H, W] fp32: Wn(p, p + o) = D(p)^−½ · exp(−‖lab(p) − lab(p + o)‖/τ) · D(p + o)^−½ for each
    offset o, 0 where p + o leaves the image; ``lab`` [3, H, W] already scaled, D the degree (a pixel
    whose weights sum to 0 taken as 1, ``normalize_connection_graph``)."""
    height, width = lab.shape[1:]
    weights = lab.new_zeros((len(offsets), height, width))
    for index, (dy, dx) in enumerate(offsets):
        (rows, rows_at), (cols, cols_at) = _overlap(dy, height), _overlap(dx, width)
        difference = lab[:, rows, cols] - lab[:, rows_at, cols_at]
        weights[index, rows, cols] = torch.exp(-(difference ** 2).sum(dim=0).sqrt() / tau)
    degree = weights.sum(dim=0)
    scale = degree.masked_fill(degree == 0, 1).rsqrt()
    for index, (dy, dx) in enumerate(offsets):
        (rows, rows_at), (cols, cols_at) = _overlap(dy, height), _overlap(dx, width)
        weights[index, rows, cols] *= scale[rows, cols] * scale[rows_at, cols_at]
    return weights


def stencil_product(stencil: torch.Tensor, offsets: list[tuple[int, int]], x: torch.Tensor) -> torch.Tensor:
    """[H·W, Q]: Σ_o Wn(p, p + o)·x(p + o) for x [H·W, Q] (pixels in raster order), ``stencil`` [O, H, W]."""
    height, width = stencil.shape[1:]
    grid = x.reshape(height, width, -1)
    out = torch.zeros_like(grid)
    for weights, (dy, dx) in zip(stencil, offsets):
        (rows, rows_at), (cols, cols_at) = _overlap(dy, height), _overlap(dx, width)
        out[rows, cols].addcmul_(weights[rows, cols, None], grid[rows_at, cols_at])  # in place: no temporary
    return out.reshape(x.shape)


def propagate_over_pixels(logits: torch.Tensor, rgb: torch.Tensor, config: LPOSSPlusConfig) -> torch.Tensor:
    """[Q, H, W] fp64: logits [Q, H, W] propagated over the pixel graph of the image ``rgb`` [3, H, W] in
    [0, 1]; queries solved in slabs when all of them together would exceed the memory budget (each
    query's solve is its own, so slabs change no value)."""
    offsets = neighbour_offsets(config.window)
    scale = torch.tensor(LAB_SCALE, dtype=torch.float32, device=rgb.device)[:, None, None]
    stencil = normalised_stencil(rgb_to_lab(rgb.float()) / scale, offsets, config.tau).to(torch.float64)
    queries, height, width = logits.shape
    labels = logits.permute(1, 2, 0).reshape(height * width, queries)
    # conjugate gradients hold five [H·W, Q] fp64 tensors
    slab = queries if fits_whole(5 * 2 * labels.numel()) else per_slab(5 * 2 * height * width)
    solved = torch.cat([propagate(lambda x: stencil_product(stencil, offsets, x), labels[:, start:start + slab],
                                  config.alpha, config.iters, CG_TOLERANCE)
                        for start in range(0, queries, slab)], dim=1)
    return solved.T.reshape(queries, height, width)


@register
class LPOSSPlusRefiner(Refiner):
    name = "lposs_plus"
    Config = LPOSSPlusConfig
    config_prefix = "lposs_plus_"
    order = 30  # after PAMR and TLP; LPOSS runs it alone, last

    def refine(self, item: WindowedImage, logits: OriginalSizeLogits, guide: Guide, info: dict
               ) -> OriginalSizeLogits:
        size = tuple(item.input.shape[1:])
        source = logits.source.float()
        if tuple(source.shape[1:]) != size:  # a whole-image prediction at the patch grid
            source = upsample(source, size)
        refined = propagate_over_pixels(source, self.context.normalisation.unnormalised(item.input), self.config)
        return OriginalSizeLogits(refined, logits.size, refined.dtype)
