"""Token calibration shared by SC-CLIP and SFP (whose released code copies SC-CLIP's pieces):
local-outlier-factor anomaly detection, neighbour-mean replacement of anomalous tokens, the
thresholded cosine similarity of an intermediate layer, aggregation with it, that similarity
as an attention map, and the layer map both read from a 12-block ViT.

SuleBai/SC-CLIP@0417ba9 ``clip/model.py`` (``lof_pytorch``, ``mean_interpolation``,
``adaptively_aggregate``, ``custom_attn``); Kimsure/SFP@2804f5b ``SFP_ICCV/clip/model.py``;
docs/methods.md §6.1 and §9.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SIMILARITY_FLOOR = 0.4
LOF_NEIGHBOURS = 30
LOF_CONTAMINATION = 0.05
_DISTANCE_CHUNK_ELEMENTS = 1 << 25  # bounds the [B, rows, N, C] difference tensor of one chunk


def squared_distances(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, N] squared Euclidean distances of tokens [B, N, C], in the tokens' dtype.

    Formed as upstream forms them, ‖xᵢ − xⱼ‖ of the differences then squared (``torch.cdist``
    rounds differently, which moves the outlier set near its threshold); rows in chunks so a
    whole-image grid does not hold all N²·C differences at once.
    """
    b, n, c = tokens.shape
    rows = max(1, _DISTANCE_CHUNK_ELEMENTS // max(1, b * n * c))
    return torch.cat([torch.linalg.vector_norm(tokens[:, i:i + rows, None] - tokens[:, None], dim=-1)
                      for i in range(0, n, rows)], dim=1) ** 2


def lof_outliers(tokens: torch.Tensor, neighbours: int = LOF_NEIGHBOURS,
                 contamination: float = LOF_CONTAMINATION) -> torch.Tensor:
    """[B, N] bool: local-outlier-factor outliers of tokens [B, N, C], SC-CLIP's ``lof_pytorch`` per
    image: squared distances, each point's own k-distance in the reachability, LRD = k / mean
    reachability, outliers = LOF strictly above its (1 − contamination) quantile (taken in fp32).

    Computed in the tokens' dtype, as upstream. Upstream needs N > k; here k shrinks to N − 1 on
    smaller grids (the ratios LRD_j / LRD_i do not depend on the numerator).
    """
    k = min(neighbours, tokens.shape[1] - 1)
    knn_dist, knn_idx = squared_distances(tokens).topk(k + 1, dim=-1, largest=False)
    knn_dist, knn_idx = knn_dist[..., 1:], knn_idx[..., 1:]
    reach = torch.maximum(knn_dist, knn_dist[..., -1:].expand_as(knn_dist))
    lrd = k / torch.nan_to_num(reach.mean(dim=-1), nan=1e-6)
    lof = (torch.gather(lrd, 1, knn_idx.flatten(1)).view_as(knn_dist) / lrd[..., None]).mean(dim=-1)
    return lof > torch.quantile(lof.float(), 1 - contamination, dim=-1, keepdim=True)


def purify(tokens: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int], guard: bool = False
           ) -> torch.Tensor:
    """Replace each outlier cell of tokens [B, N, C] (row-major on the grid (h, w)) by the mean of its
    in-bounds non-outlier 8-neighbours; a cell with none becomes 0 (SFP), or with ``guard`` stays
    unchanged (SC-CLIP's ``mean_interpolation``)."""
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


def cosine_similarity(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, N] cosine similarities of tokens [B, N, C]."""
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(-1, -2)


def floored(sim: torch.Tensor) -> torch.Tensor:
    """``sim`` with entries below 0.4 set to 0 (the aggregation weights)."""
    return sim.masked_fill(sim < SIMILARITY_FLOOR, 0)


def similarity(tokens: torch.Tensor) -> torch.Tensor:
    """[B, N, N] cosine similarities with entries below 0.4 set to 0."""
    return floored(cosine_similarity(tokens))


def aggregate(sim: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """D⁻¹ S X with D = diag(row sums of S + 1e−6); S is normalised before the product, as upstream
    ``adaptively_aggregate`` does (the order matters in fp16)."""
    return (sim / (sim.sum(dim=-1, keepdim=True) + 1e-6)) @ tokens


def similarity_attention(sim: torch.Tensor) -> torch.Tensor:
    """[B, 1, N, N]: softmax over keys of 3·(S − mean S) with its negative entries −∞, the mean taken
    over each image's whole matrix (upstream runs one image at a time). Row i keeps at least its
    diagonal when S is a cosine matrix (S_ii = 1 ≥ mean)."""
    centred = 3 * (sim - sim.mean(dim=(-1, -2), keepdim=True))
    return torch.softmax(centred.masked_fill(centred < 0, float("-inf")), dim=-1)[:, None]


def layer_map(layers: tuple | None, num_blocks: int, default: tuple, parameter: str, method: str) -> tuple:
    """The 1-based block outputs a method reads: ``layers`` when given, else the released ``default``,
    which the released code fixes for a 12-block ViT (any other depth must map them explicitly)."""
    if layers is not None:
        if any(not 1 <= layer <= num_blocks - 1 for layer in layers):
            raise ValueError(f"{parameter}={list(layers)}: each layer must be a block output in 1..{num_blocks - 1}")
        return tuple(layers)
    if num_blocks != 12:
        raise ValueError(f"{method}'s released code reads fixed layers {default} of a 12-block ViT; this model has "
                         f"{num_blocks} blocks. Pass {parameter}=[...] (1-based block outputs) to map them explicitly.")
    return default
