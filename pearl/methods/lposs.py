"""LPOSS: CLIP's patch logits propagated over one graph of all the image's windows' patches, whose
edges come from a second vision model (and, as LPOSS+, over the pixels: ``pearl.refine.lposs_plus``).

vladan-stojnic/LPOSS@e489a74, docs/methods.md §12. The CLIP side is CLIP-DINOiser's MaskCLIP
(``models/maskclip/maskclip.py``): each token's value embedding through the output projection with the
block's residual and FFN kept (``extract_v``), then ``ln_post`` and the projection; positions resized
bicubically to the size. Then ``segmentation/evaluation/lposs_eval.py`` ``slide_inference``: the vision
model's (DINO ViT-B/16's) last-block value projection of every window's patches as node features, a kNN
graph over all of them weighted by their distance in the image (``get_lposs_laplacian``), the windows'
cosine logits propagated by conjugate gradients (``perform_lp``); each window's result is then fused
as any window's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..params import default
from ..preprocess import Window
from ..propagation import knn_affinity, propagate, symmetric_normalised
from ..towers import Tower
from ..vfm import WindowProjections
from . import register
from .base import Method, value_block

CG_TOLERANCE = 1e-6  # lposs_eval.py dfs_search's tol, relative to each query's initial residual


@dataclass(frozen=True)
class LPOSSConfig:
    k: int = default("lposs_k")
    feature: str = default("lposs_feature")
    gamma: float = default("lposs_gamma")
    sigma: float = default("lposs_sigma")
    distance_power: float = default("lposs_distance_power")
    alpha: float = default("lposs_alpha")
    iters: int = default("lposs_iters")


def patch_centres(windows: Sequence[Window], grid: tuple[int, int], patch: int, device: torch.device
                  ) -> torch.Tensor:
    """[len(windows)·h·w, 2] fp32 (y, x): the centre of each patch of each window in input pixels,
    windows in order, patches in raster order (``get_lposs_laplacian``: corner + patch // 2 + index·patch)."""
    rows = torch.arange(grid[0], device=device).repeat_interleave(grid[1]) * patch + patch // 2
    cols = torch.arange(grid[1], device=device).repeat(grid[0]) * patch + patch // 2
    corners = torch.tensor([(window.y1, window.x1) for window in windows], device=device)
    centres = corners[:, None, :] + torch.stack([rows, cols], dim=1)[None]
    return centres.reshape(-1, 2).float()


def propagate_over_patches(labels: torch.Tensor, features: torch.Tensor, positions: torch.Tensor,
                           config: LPOSSConfig) -> torch.Tensor:
    """[N, Q] fp64: the patches' logits ``labels`` [N, Q] propagated over the kNN graph of their
    vision-model ``features`` [N, C] (unit-normalised here) and ``positions`` [N, 2]."""
    nodes = F.normalize(features.float(), dim=-1)
    affinity = knn_affinity(nodes, positions, config.k, config.gamma, config.sigma, config.distance_power)
    return propagate(symmetric_normalised(affinity), labels, config.alpha, config.iters, CG_TOLERANCE)


@register
class LPOSS(Method):
    name = "lposs"
    Config = LPOSSConfig
    config_prefix = "lposs_"
    needs_vfm = True
    propagates_across_windows = True
    position_interpolation = "size"

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        return value_block(tower, x, grid, "vanilla", info)

    def window_features(self, feats: torch.Tensor, windows: torch.Tensor, vfm: Tower | None) -> torch.Tensor:
        """CLIP's unit features resampled bilinearly to the vision model's grid and normalised again where
        the two grids differ (DINO B/8, DINOv2 B/14), as ``slide_inference`` resamples them."""
        grid = (windows.shape[-2] // vfm.patch_size, windows.shape[-1] // vfm.patch_size)
        if tuple(feats.shape[1:3]) == grid:
            return feats
        resampled = F.interpolate(feats.permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
        return F.normalize(resampled.permute(0, 2, 3, 1), dim=-1)

    def across_windows(self, patch_logits: list[torch.Tensor], windows: Sequence[Window], vision: WindowProjections
                       ) -> list[torch.Tensor]:
        """Each window's [Q, h'', w''] logits (fp64) after the propagation over all windows' patches, from
        their [Q, h'', w''] cosine logits (on the vision model's grid: ``window_features``) and the vision
        model's projections of the windows (all windows of one image in one forward, as upstream's)."""
        features = vision.features(self.config.feature)
        count, grid = features.shape[0], tuple(features.shape[1:3])
        logits = torch.stack(patch_logits).float()
        labels = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
        positions = patch_centres(windows, grid, vision.model.patch_size, logits.device)
        propagated = propagate_over_patches(labels, features.reshape(-1, features.shape[-1]), positions, self.config)
        return list(propagated.reshape(count, *grid, -1).permute(0, 3, 1, 2))
