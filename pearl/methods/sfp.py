"""SFP (Self-adaptive Feature Purifier): outlier purification, similarity aggregation and a
multi-layer branch in place of the last block.

Kimsure/SFP@2804f5b ``SFP_ICCV/clip/model.py`` (``VisionTransformer.forward``, ``custom_attn``,
``mean_interpolation``, ``adaptively_aggregate``) as specified in docs/methods.md §6.1. Layer numbers
x_ℓ are block outputs, 1-based; the released code hard-codes them for a 12-block ViT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import default
from . import register
from .base import Method, keep_attention
from .calibration import aggregate, layer_map, lof_outliers, purify, similarity, similarity_attention

OUTLIERS = ("som", "l2", "lof")
DEFAULT_LAYERS = (9, 4, 4, 10)  # S_pre from x9, S_post from x4, multi-layer sum x4..x10
NUM_OUTLIERS = 10


def _patches(x: torch.Tensor) -> torch.Tensor:
    return x[:, 1:]


def _som_outliers(block, x_prev: torch.Tensor, res_cls: float, count: int) -> torch.Tensor:
    """[B, N] bool: patches whose (scaled) CLS attention exceeds their self-attention, top ``count``.

    Attention of block L−1 (input x_prev = x_{L−2}); its CLS→patch row is multiplied by
    res_cls·5 (1.5 at the released 0.3) for detection only.
    """
    q, k, _ = block.qkv(block.norm(x_prev))
    attn = torch.softmax((q * block.scale) @ k.transpose(-1, -2), dim=-1)
    attn[:, :, 0, 1:] *= res_cls * 5.0
    mean = attn.mean(dim=1)
    cls_score = mean[:, 0, 1:]
    self_score = torch.diagonal(mean, dim1=-2, dim2=-1)[:, 1:]
    ranked = torch.where(cls_score > self_score, cls_score, torch.full_like(cls_score, float("-inf")))
    top = ranked.topk(min(count, ranked.shape[1]), dim=1)
    mask = torch.zeros_like(cls_score, dtype=torch.bool)
    mask.scatter_(1, top.indices, torch.isfinite(top.values))
    return mask


def _l2_outliers(tokens: torch.Tensor, count: int) -> torch.Tensor:
    norms = tokens.float().norm(dim=-1)
    mask = torch.zeros_like(norms, dtype=torch.bool)
    return mask.scatter_(1, norms.topk(min(count, norms.shape[1]), dim=1).indices, True)


@dataclass(frozen=True)
class SFPConfig:
    outlier: str = default("sfp_outlier")
    purify: bool = default("sfp_purify")
    res_cls: float = default("sfp_res_cls")
    nan_guard: bool = default("sfp_nan_guard")
    layers: tuple | None = default("sfp_layers")


@register
class SFP(Method):
    name = "sfp"
    needs_hidden_states = True
    reads_cls = "SFP reads the CLS token (its outlier detection and residual)"
    Config = SFPConfig
    config_prefix = "sfp_"

    def releases_nan_windows(self) -> bool:
        # the released purification zeroes an outlier with no clean neighbour: its window turns NaN
        return self.config.purify and not self.config.nan_guard

    def _outliers(self, tower, hidden, grid) -> torch.Tensor:
        mode = self.config.outlier
        if mode == "som":
            return _som_outliers(tower.block(-2, grid), hidden[-2], self.config.res_cls, NUM_OUTLIERS)
        if mode == "l2":
            return _l2_outliers(_patches(hidden[-1]), NUM_OUTLIERS)
        if mode == "lof":
            return lof_outliers(_patches(hidden[-1]))
        raise ValueError(f"sfp_outlier {mode!r} is not one of {', '.join(OUTLIERS)}")

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        self.check_tower(tower)
        pre, post, first, last = layer_map(self.config.layers, tower.num_blocks, DEFAULT_LAYERS, "sfp_layers", "SFP")
        block = tower.block(-1, grid)
        x_last = hidden[-1]
        guard = self.config.nan_guard
        res_cls = self.config.res_cls
        if self.config.purify:
            outliers = self._outliers(tower, hidden, grid)
            main = purify(_patches(x_last), outliers, grid, guard)
            pre_tokens = purify(_patches(hidden[pre - 1]), outliers, grid, guard)
        else:
            main, pre_tokens = _patches(x_last), _patches(hidden[pre - 1])
        sim_pre = similarity(pre_tokens)
        sim_post = similarity(_patches(hidden[post - 1]))
        map_attn = similarity_attention(sim_pre)

        q, k, v = block.qkv(block.norm(aggregate(sim_pre, main)))
        scale = block.scale
        attn = (torch.softmax((k @ k.transpose(-1, -2)) * scale, dim=-1)
                + torch.softmax((q @ q.transpose(-1, -2)) * scale, dim=-1) + map_attn) / 3
        keep_attention(info, attn)  # the main branch's; patch tokens only (no CLS row or column)
        main_out = block.project(attn @ v) + res_cls * x_last[:, :1]

        layer_sum = torch.stack(hidden[first - 1:last]).sum(dim=0)  # as upstream: one reduction, not chained adds
        _, _, v_sum = block.qkv(block.norm(_patches(layer_sum)))
        multi_out = block.project(map_attn @ v_sum) + res_cls * layer_sum[:, :1]

        return aggregate(sim_post, main_out) + aggregate(sim_post, multi_out)
