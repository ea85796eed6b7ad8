"""CASS: CLIP's last-block key-key attention mixed, head by head, with a low-rank image of a second
vision model's key-key attention (spectral object-level context), and prompts adjusted per window
from the image's CLS embedding (object presence prior).

MICV-yonsei/CASS@228ecdd, docs/methods.md §13. ``clip/model.py`` ``VisionTransformer.custom_attn``
(attn_strategy='spectral', arch='reduced'): over the patch tokens alone (the CLS token dropped from
q, k and v), CLIP's k·kᵀ·s and the vision model's last-block keys (DINO ViT-B/8) resampled to CLIP's
grid and stretched to the range of CLIP's keys, k·kᵀ·s; per head the top eigenvalues of both, their
heads matched by the Wasserstein distance of their spectra (Hungarian); each matched vision head's
adjacency approximated at rank 10, singular values stretched, diagonal zeroed, stretched to the CLIP
head's range and mixed in; then NACLIP's Gaussian bias, softmax, out_proj(A·v). ``cass_segmentor.py``:
the prompts clustered by a Ward tree of their cosine distances; per cluster the prompt closest to the
image's CLS embedding moved towards the mean of its two best patches; the logits mixed with the CLS
similarity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ConfigError
from ..params import default
from ..preprocess import Normalisation
from ..towers import Tower
from . import register
from .base import Method, keep_attention
from .naclip import neighbourhood_bias_like

# cass_segmentor.py ``inv_normalize``: ImageNet's statistics undone on CLIP-normalised input, with 0.255
# where ImageNet's blue std is 0.225
RELEASED_UNDO_MEAN = (0.485, 0.456, 0.406)
RELEASED_UNDO_STD = (0.229, 0.224, 0.255)
DINOV2_INPUT_SIDE = 518  # dinov2/dino_attention.py: Dinov2SelfAttention resizes its input to 518 × 518
POWER_ITERATIONS = 2     # torch.svd_lowrank's default niter
LOW_RANK_SEED = 0        # the randomised SVD's test matrices, drawn afresh for every window
TOP_PATCHES = 2          # _compute_topk_similarities' k


@dataclass(frozen=True)
class CASSConfig:
    global_weight: float = default("cass_global_weight")
    mean_vector_weight: float = default("cass_mean_vector_weight")
    h_threshold: float = default("cass_h_threshold")
    global_embedding: str = default("cass_global_embedding")
    gauss_std: float = default("cass_gauss_std")
    vfm_weight: float = default("cass_vfm_weight")
    eigenvalues: int = default("cass_eigenvalues")
    rank: int = default("cass_rank")
    low_rank: str = default("cass_low_rank")
    rescale_singular_values: bool = default("cass_rescale_singular_values")
    head_pairing: str = default("cass_head_pairing")


def released_pixels(windows: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] uint8: what ``forward_feature`` hands the vision model, CLIP-normalised windows
    (fp32) "un-normalised" with ImageNet's statistics (``RELEASED_UNDO_STD``'s typo included), ×255 and
    truncated to uint8, in torchvision's ``Normalize`` arithmetic (x − (−m/s)) / (1/s)."""
    mean = torch.tensor([-m / s for m, s in zip(RELEASED_UNDO_MEAN, RELEASED_UNDO_STD)], device=windows.device)
    std = torch.tensor([1 / s for s in RELEASED_UNDO_STD], device=windows.device)
    undone = (windows.float() - mean[:, None, None]) / std[:, None, None] * 255
    return undone.to(torch.uint8)  # truncation as numpy's astype('uint8'); the values lie in (7, 244)


def _resized(pixels: torch.Tensor, side: int, resample: Image.Resampling) -> torch.Tensor:
    """[3, side, side] uint8: a [3, H, W] uint8 image resized by PIL (its antialiased filters)."""
    image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).resize((side, side), resample)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).to(pixels.device)


def vision_input(vfm: Tower, windows: torch.Tensor, clip_normalisation: Normalisation) -> torch.Tensor:
    """[B, 3, h, w]: the vision model's input as CASS makes it from CLIP-normalised windows
    [B, 3, H, W]: ``released_pixels``, resized by PIL (bicubic) to a square of the shorter side
    (``VisionTransformer.forward``; sliding windows are square already), for a patch-14 model (DINOv2)
    then to 518² (bilinear), then ToTensor, the model's own Normalize and a crop to a multiple of its
    patch (``DinoSelfAttention.forward``). CLIP's own statistics play no part: the released undo
    assumes nothing about them."""
    pixels = released_pixels(windows)
    side = min(pixels.shape[-2:])
    if pixels.shape[-2] != pixels.shape[-1]:
        pixels = torch.stack([_resized(one, side, Image.Resampling.BICUBIC) for one in pixels])
    patch = vfm.patch_size
    if patch == 14:
        side = DINOV2_INPUT_SIDE
        pixels = torch.stack([_resized(one, side, Image.Resampling.BILINEAR) for one in pixels])
    mean, std = (torch.tensor([value / 255 for value in values], device=pixels.device)[:, None, None]
                 for values in (vfm.normalisation.mean, vfm.normalisation.std))
    inputs = (pixels.float() / 255 - mean) / std
    usable = side - side % patch
    return inputs[:, :, :usable, :usable].to(vfm.dtype)


def keys_on_grid(keys: torch.Tensor, heads: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, heads, h'w', d]: the vision model's keys [B, h'', w'', heads·d] (heads side by side) resampled
    bilinearly (align_corners=False) to CLIP's ``grid`` (``_process_dino_key``)."""
    batch, height, width, channels = keys.shape
    maps = keys.reshape(batch, height, width, heads, channels // heads).permute(0, 3, 4, 1, 2)
    maps = F.interpolate(maps.reshape(batch * heads, channels // heads, height, width), size=grid, mode="bilinear",
                         align_corners=False)
    return maps.reshape(batch, heads, channels // heads, -1).transpose(-1, -2)


def stretched_to(source: torch.Tensor, target: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``source`` min–max rescaled over ``dims`` onto the range of ``target`` over the same dims
    (``_normalize_key_range``, ``_normalize_attention_range``)."""
    low, high = source.amin(dims, keepdim=True), source.amax(dims, keepdim=True)
    target_low, target_high = target.amin(dims, keepdim=True), target.amax(dims, keepdim=True)
    return (source - low) / (high - low) * (target_high - target_low) + target_low


def spectra(adjacency: torch.Tensor, count: int) -> torch.Tensor:
    """[..., count] fp64: the ``count`` largest eigenvalues of symmetric [..., N, N] matrices, largest
    first, L2-normalised (``compute_spectrum``, then ``F.normalize``)."""
    values = torch.linalg.eigvalsh(adjacency.double()).flip(-1)[..., :count]
    return F.normalize(values, p=2, dim=-1)


def spectral_costs(vision_spectra: torch.Tensor, clip_spectra: torch.Tensor) -> torch.Tensor:
    """[B, heads, heads] fp32: 1 − W(vision head i, CLIP head j), W the sum of absolute differences of
    the sorted L1-normalised spectra [B, heads, E] (``wasserstein_distance_pytorch``), as the released
    cost matrix (which the Hungarian matching minimises, so it pairs the most distant spectra)."""
    vision = torch.sort(F.normalize(vision_spectra, p=1, dim=-1), dim=-1).values
    clip = torch.sort(F.normalize(clip_spectra, p=1, dim=-1), dim=-1).values
    distance = (vision[:, :, None, :] - clip[:, None, :, :]).abs().sum(-1)
    return (1 - distance).float()


def head_pairs(costs: np.ndarray, pairing: str) -> list[tuple[int, int]]:
    """(CLIP head, vision head) for every CLIP head, from one window's cost matrix [vision, CLIP]
    (``scipy.optimize.linear_sum_assignment``): ``released`` pairs CLIP head i with vision head c(i),
    c(i) the CLIP head matched to vision head i (``_apply_spectral_strategy`` indexes crossed);
    ``matched`` with the vision head matched to it."""
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(costs)
    if pairing == "released":
        return [(int(row), int(col)) for row, col in zip(rows, cols)]
    return sorted((int(col), int(row)) for row, col in zip(rows, cols))


def low_rank(adjacency: torch.Tensor, rank: int, method: str, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [N, q], S [q], V [N, q] with U·diag(S)·Vᵀ ≈ the square fp64 ``adjacency`` [N, N] at rank q:
    ``exact`` the truncated SVD; ``randomized`` Halko et al.'s range finder with ``POWER_ITERATIONS``
    and a Gaussian test matrix from ``generator`` (CPU), as ``torch.svd_lowrank`` (which draws it from
    the global generator: ``_lowrank.py`` ``get_approximate_basis``, ``_svd_lowrank``)."""
    if method == "exact":
        u, s, vh = torch.linalg.svd(adjacency)
        return u[:, :rank], s[:rank], vh[:rank].mT
    test = torch.randn(adjacency.shape[-1], rank, dtype=adjacency.dtype, generator=generator)
    basis = torch.linalg.qr(adjacency @ test.to(adjacency.device)).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(adjacency.mT @ basis).Q
        basis = torch.linalg.qr(adjacency @ basis).Q
    u, s, vh = torch.linalg.svd(basis.mT @ adjacency, full_matrices=False)
    return basis @ u, s, vh.mT


def stretched_singular_values(s: torch.Tensor) -> torch.Tensor:
    """S min–max stretched to [0.5·min S, 1.5·max S] (``_scale_singular_values``)."""
    low, high = s.min(), s.max()
    return (s - low) / (high - low) * (1.5 * high - 0.5 * low) + 0.5 * low


def mixed_adjacency(clip_keys: torch.Tensor, vision_keys: torch.Tensor, scale: float, config: CASSConfig
                    ) -> torch.Tensor:
    """[heads, N, N] in the keys' dtype: one window's CLIP k·kᵀ·s, each head mixed with its paired
    vision head's low-rank adjacency, (w·f·Â + A)/(w·f + 1), w = 1 − cost of the pair, f = ``vfm_weight``
    (``_apply_spectral_strategy``; the mix in fp64 as there, where Â is fp64).

    ``clip_keys``, ``vision_keys`` [heads, N, d], the vision keys already on CLIP's grid and range."""
    clip = (clip_keys @ clip_keys.mT) * scale
    vision = (vision_keys @ vision_keys.mT) * scale
    costs = spectral_costs(spectra(vision, config.eigenvalues)[None], spectra(clip, config.eigenvalues)[None])[0]
    generator = torch.Generator().manual_seed(LOW_RANK_SEED) if config.low_rank == "randomized" else None
    rank = min(config.rank, clip.shape[-1])
    mixed = torch.empty_like(clip)
    for clip_head, vision_head in head_pairs(costs.cpu().numpy(), config.head_pairing):
        matched = (clip_head, vision_head) if config.head_pairing == "released" else (vision_head, clip_head)
        weight = 1 - costs[matched]
        u, s, v = low_rank(vision[vision_head].double(), rank, config.low_rank, generator)
        if config.rescale_singular_values:
            s = stretched_singular_values(s)
        approx = (u * s) @ v.mT
        approx.fill_diagonal_(0)
        approx = stretched_to(approx, clip[clip_head], (-2, -1))  # the target's range in its dtype, as there
        mixed[clip_head] = (weight * config.vfm_weight * approx + clip[clip_head]) / (weight * config.vfm_weight + 1)
    return mixed


def query_clusters(prototypes: torch.Tensor, threshold: float) -> torch.Tensor:
    """[Q] int64: each prompt's cluster (0-based), the Ward tree (``scipy.cluster.hierarchy.linkage``)
    of the prompts' cosine distances (fp64, as sklearn's ``cosine_distances``) cut at ``threshold``
    (``fcluster``, criterion 'distance'), as ``hierarchical_clustering``."""
    if prototypes.shape[0] == 1:
        return torch.zeros(1, dtype=torch.int64)
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    x = prototypes.double().cpu().numpy()
    x = x / np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    distances = np.clip(1 - x @ x.T, 0, 2)
    np.fill_diagonal(distances, 0)
    tree = linkage(squareform(distances, checks=False), method="ward")
    return torch.from_numpy(fcluster(tree, t=threshold, criterion="distance").astype(np.int64) - 1)


def adjusted_prototypes(feats: torch.Tensor, prototypes: torch.Tensor, similarity: torch.Tensor,
                        clusters: torch.Tensor, weight: float) -> torch.Tensor:
    """[B, Q, D]: per window, the prototypes [Q, D] with the prompt of each cluster most similar to the
    window's image embedding (``similarity`` [B, Q]; the first on ties) replaced by
    normalise((1 − weight)·t + weight·m), m the normalised mean of the window's ``TOP_PATCHES`` unit
    patch features [B, N, D] most similar to it (``hierarchical_prompt``)."""
    batch, patches, dim = feats.shape
    members = clusters.to(feats.device)[None, :] == torch.arange(int(clusters.max()) + 1, device=feats.device)[:, None]
    chosen = similarity[:, None, :].masked_fill(~members, float("-inf")).argmax(-1)  # [B, K]
    text = F.normalize(prototypes[chosen], dim=-1)
    scores = F.normalize(feats, dim=-1) @ text.mT  # [B, N, K]
    top = scores.topk(min(TOP_PATCHES, patches), dim=1).indices  # [B, k, K]
    picked = torch.gather(feats, 1, top.flatten(1)[..., None].expand(-1, -1, dim))
    picked = picked.reshape(batch, -1, top.shape[-1], dim)
    mean = F.normalize(picked.mean(1), dim=-1)
    adjusted = F.normalize((1 - weight) * text + weight * mean, dim=-1)
    return prototypes.expand(batch, -1, -1).scatter(1, chosen[..., None].expand(-1, -1, dim), adjusted)


@register
class CASS(Method):
    name = "cass"
    Config = CASSConfig
    config_prefix = "cass_"
    needs_vfm = True
    vfm_feature = "k"
    prepare_vfm_input = staticmethod(vision_input)
    whole_upsample_via_input = True  # forward_feature upsamples to the input, predict to the original size
    reads_cls = "CASS reads the CLS token (its image embedding)"

    def __init__(self, config: CASSConfig | None = None) -> None:
        super().__init__(config)
        self._clusters: tuple[torch.Tensor, torch.Tensor] | None = None

    def check_vfm(self, tower: Tower, vfm: Tower) -> None:
        """The vision model's last-block heads must be CLIP's, head for head (``_process_dino_key`` reshapes
        its keys into CLIP's heads)."""
        ours, theirs = tower.block(-1, (1, 1)), vfm.block(-1, (1, 1))
        if (ours.heads, ours.head_dim) != (theirs.heads, theirs.head_dim):
            raise ConfigError(f"CASS pairs the vision model's key heads with CLIP's: the vision model's last block has "
                              f"{theirs.heads} heads of {theirs.head_dim}, CLIP's {ours.heads} of {ours.head_dim}; "
                              f"use a vision model of CLIP's width (ViT-B/8 or /16 beside a ViT-B CLIP)")

    @property
    def reads_image_embedding(self) -> str:
        return self.config.global_embedding

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        if feedback is None:
            raise ValueError("cass's last block needs the vision model's keys of the windows")
        block = tower.block(-1, grid)
        _, k, v = block.qkv(block.norm(x))
        k, v = k[:, :, tower.prefix_tokens:], v[:, :, tower.prefix_tokens:]
        vision = stretched_to(keys_on_grid(feedback.to(k.dtype), k.shape[1], grid), k, (1, 2, 3))
        attn = torch.stack([mixed_adjacency(k[b], vision[b], block.scale, self.config) for b in range(k.shape[0])])
        attn = torch.softmax(attn + neighbourhood_bias_like(grid, self.config.gauss_std, 0, attn), dim=-1)
        keep_attention(info, attn)
        return block.project(attn @ v)

    def logits(self, feats, prototypes, embeddings):
        similarity = embeddings @ prototypes.T
        if self._clusters is None or self._clusters[0] is not prototypes:
            self._clusters = (prototypes, query_clusters(prototypes, self.config.h_threshold))
        flat = feats.flatten(1, 2)
        adjusted = adjusted_prototypes(flat, prototypes, similarity, self._clusters[1], self.config.mean_vector_weight)
        weight = self.config.global_weight
        logits = (flat @ adjusted.mT) * (1 - weight) + similarity[:, None, :] * weight
        return logits.reshape(*feats.shape[:3], -1)
