"""SFP (Self-adaptive Feature Purifier): outlier purification, similarity aggregation and a
multi-layer branch in place of the last block.

Kimsure/SFP@2804f5b ``SFP_ICCV/clip/model.py`` (``VisionTransformer.forward``, ``custom_attn``,
``mean_interpolation``, ``adaptively_aggregate``) as specified in docs/methods.md §6.1. Layer numbers
x_ℓ are block outputs, 1-based; the released code hard-codes them for a 12-block ViT.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import default
from . import register
from .base import Method, keep_attention

OUTLIERS = ("som", "l2", "lof")
DEFAULT_LAYERS = (9, 4, 4, 10)  # S_pre from x9, S_post from x4, multi-layer sum x4..x10
NUM_OUTLIERS = 10
SIMILARITY_FLOOR = 0.4


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


def _lof_outliers(tokens: torch.Tensor, neighbours: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """[B, N] bool: local-outlier-factor outliers of the patch tokens, as SFP's ``lof_pytorch``
    (from SC-CLIP): squared distances, each point's own k-distance in the reachability, LRD =
    k / mean reachability, outliers = LOF above its (1 − contamination) quantile."""
    feats = tokens.float()
    k = min(neighbours, feats.shape[1] - 1)
    dist = torch.cdist(feats, feats) ** 2
    knn_dist, knn_idx = dist.topk(k + 1, dim=-1, largest=False)
    knn_dist, knn_idx = knn_dist[..., 1:], knn_idx[..., 1:]
    reach = torch.maximum(knn_dist, knn_dist[..., -1:].expand_as(knn_dist))
    lrd = k / torch.nan_to_num(reach.mean(dim=-1), nan=1e-6)
    lof = (torch.gather(lrd, 1, knn_idx.flatten(1)).view_as(knn_dist) / lrd[..., None]).mean(dim=-1)
    return lof > torch.quantile(lof, 1 - contamination, dim=-1, keepdim=True)


def purify(tokens: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int], guard: bool = False
           ) -> torch.Tensor:
    """Replace each outlier cell of tokens [B, N, C] by the mean of its in-bounds non-outlier
    8-neighbours (0 if none; with ``guard``, such a cell is left unchanged instead)."""
    b, n, c = tokens.shape
    h, w = grid
    keep = (~outliers).to(tokens.dtype).view(b, 1, h, w)
    values = tokens.transpose(1, 2).reshape(b, c, h, w) * keep
    ring = torch.ones(1, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    ring[..., 1, 1] = 0
    total = F.conv2d(values.reshape(b * c, 1, h, w), ring, padding=1).view(b, c, h, w)
    count = F.conv2d(keep, ring, padding=1)
    mean = torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))
    mean = mean.flatten(2).transpose(1, 2)
    replace = outliers[..., None]
    if guard:
        replace = replace & (count.flatten(1) > 0)[..., None]
    return torch.where(replace, mean, tokens)


def similarity(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, N] cosine similarities with entries below 0.4 set to 0."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    sim = unit @ unit.transpose(-1, -2)
    return sim.masked_fill(sim < SIMILARITY_FLOOR, 0)


def aggregate(sim: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """D⁻¹ S X with D = diag(row sums of S + 1e−6); S is normalised before the product, as upstream
    ``adaptively_aggregate`` does (the order matters in fp16)."""
    return (sim / (sim.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


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
            return _lof_outliers(_patches(hidden[-1]))
        raise ValueError(f"sfp_outlier {mode!r} is not one of {', '.join(OUTLIERS)}")

    def last_block(self, tower, x, hidden, grid, info):
        if not (tower.has_cls and tower.prefix_tokens == 1):
            raise ValueError(f"SFP reads the CLS token (its outlier detection and residual); the image tower "
                             f"{tower.name} has {tower.prefix_tokens} prefix tokens and "
                             f"{'a' if tower.has_cls else 'no'} CLS token")
        layers = self.config.layers
        if layers is None:
            if tower.num_blocks != 12:
                raise ValueError(
                    f"SFP's released code reads fixed layers (x9, x4, x4..x10) of a 12-block ViT; this model has "
                    f"{tower.num_blocks} blocks. Pass sfp_layers=[pre, post, first, last] (1-based block outputs) "
                    f"to map them explicitly.")
            layers = DEFAULT_LAYERS
        pre, post, first, last = layers
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
        centred = 3 * (sim_pre - sim_pre.mean(dim=(-1, -2), keepdim=True))
        map_attn = torch.softmax(centred.masked_fill(centred < 0, float("-inf")), dim=-1)[:, None]

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
