"""ProxyCLIP: the last block's attention replaced by a proxy attention from a second vision model's
patch features, applied to CLIP's value embeddings resampled to that model's grid, in a reduced
block (no residual, no FFN).

mc-lan/ProxyCLIP@e7b767f ``open_clip/transformer.py`` ``VisionTransformer.custom_attn`` under
``proxyclip_segmentor.py`` (docs/methods.md §11): S = cos(f_i, f_j) of the vision model's normed
last-block patch tokens (DINO ViT-B/8 by default), A = softmax over keys of γ·(S − β·mean S) with its
negative entries −∞, the same for every head; CLIP's per-head values of the patch tokens (through
``ln_1`` and ``in_proj``) resampled bilinearly from CLIP's grid to the vision model's; out_proj(A·v),
then ``ln_post`` and ``proj``: the features come out at the vision model's grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import default
from . import register
from .base import Method, keep_attention


@dataclass(frozen=True)
class ProxyCLIPConfig:
    beta: float = default("proxyclip_beta")
    gamma: float = default("proxyclip_gamma")


def proxy_attention(features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """[B, M, M]: softmax over keys of γ·(S − β·mean S) with its negative entries −∞, S the cosine
    similarity of the vision model's patch features [B, h, w, C] (M = h·w), in their dtype; the mean
    over each window's whole matrix (upstream runs one window per forward). A row keeps at least its
    diagonal while β·mean S < 1."""
    unit = F.normalize(features.flatten(1, 2), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    similarity = (similarity - similarity.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    return torch.softmax(similarity.masked_fill(similarity < 0, float("-inf")), dim=-1)


def values_on_grid(v: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """[B, heads, h₂w₂, d]: per-head values of the patch tokens [B, heads, h'w', d] (raster order on
    ``grid``) resampled bilinearly (align_corners=False) to ``size`` (h₂, w₂)."""
    batch, heads, _, dim = v.shape
    maps = v.reshape(batch * heads, *grid, dim).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.permute(0, 2, 3, 1).reshape(batch, heads, size[0] * size[1], dim)


@register
class ProxyCLIP(Method):
    name = "proxyclip"
    Config = ProxyCLIPConfig
    config_prefix = "proxyclip_"
    needs_vfm = True
    pad_crops_to = 56  # proxyclip_segmentor.py forward_slide: compute_padsize(H, W, 56)

    def output_grid(self, grid: tuple[int, int], feedback) -> tuple[int, int]:
        return tuple(feedback.shape[1:3])

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        if feedback is None:
            raise ValueError("proxyclip's last block needs the vision model's features of the windows")
        block = tower.block(-1, grid)
        _, _, v = block.qkv(block.norm(x))
        v = values_on_grid(v[:, :, tower.prefix_tokens:], grid, self.output_grid(grid, feedback))
        attn = proxy_attention(feedback, self.config.beta, self.config.gamma).to(v.dtype)[:, None]
        keep_attention(info, attn.expand(-1, v.shape[1], -1, -1))
        return block.project(attn @ v)
