"""ResCLIP as a switch on SCLIP, NACLIP and ClearCLIP (``resclip=true``): RCS mixes the mean
query·key attention of intermediate blocks into the last block's attention; SFR segments the
window once with that block (a first pass), turns the segmentation into a same-class attention
prior and runs the block again with it.

yvhangyang/ResCLIP@0e085f7 ``clip/model.py`` (``VisionTransformer.forward``, ``create_logit_temp``,
``create_patch_matrix``, ``generate_attention_sfr``, ``check_path``, ``custom_attn``) and
``resclip_segmentor.py``; docs/methods.md §10. A host method writes its attention with two hooks,
``before_softmax`` (SFR, on each logit map) and ``after_softmax`` (RCS, on the weights); this module
supplies them.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from ..fused import per_slab
from ..params import default
from ..refine.pamr import pamr
from ..towers.base import AttentionBlock, Tower
from .base import Method, finish_block, keep_attention

RCS_BLOCKS = (6, 9)         # 1-based blocks whose attention RCS averages (released: indices 5..8)
SFR_STD = 5.0               # the released segmentor's gaussian_std, which its SFR smoothing also uses
FIRST_PASS_PAMR = (10, (8, 16))  # iterations and dilations of the first pass's PAMR (always on upstream)
_PATH_CHUNK_SAMPLES = 1 << 23    # line samples of the same-entity check held at once (a whole image: N² pairs)

Hook = Callable[[torch.Tensor], torch.Tensor]


def _param(name: str):
    """A config field read from the flat parameter ``name`` whatever the host method's prefix."""
    return field(default=default(name), metadata={"param": name})


@dataclass(frozen=True)
class ResCLIPConfig:
    """ResCLIP's switch and weights; the config (or its base) of every host method."""

    resclip: bool = _param("resclip")
    resclip_temp_thd: float = _param("resclip_temp_thd")
    resclip_rcs_tau: float = _param("resclip_rcs_tau")
    resclip_rcs_lambda: float = _param("resclip_rcs_lambda")
    resclip_sfr_tau: float = _param("resclip_sfr_tau")
    resclip_sfr_lambda: float = _param("resclip_sfr_lambda")
    resclip_same_entity: bool = _param("resclip_same_entity")


def mix(weights: torch.Tensor, other: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    """τ·((1 − λ)·weights + λ·other), ResCLIP's blend of an attention map with a prior."""
    return tau * ((1 - lam) * weights + lam * other)


def rcs_attention(tower: Tower, hidden: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """[B, heads, T, T]: the mean of softmax(s·q kᵀ) of blocks 6..9 (each on its own input, the
    output of the block before it), the attention those blocks computed in the trunk."""
    maps = []
    for index in range(RCS_BLOCKS[0] - 1, RCS_BLOCKS[1]):  # 0-based block indices 5..8
        block = tower.block(index, grid)
        q, k, _ = block.qkv(block.norm(hidden[index - 1]))
        maps.append(torch.softmax((q * block.scale) @ k.transpose(-1, -2), dim=-1))
    return torch.stack(maps).mean(dim=0)


@dataclass(frozen=True)
class SemanticFeedback:
    """What SFR's first pass segments with: the segmentor's text prototypes [Q, D], the logit scale
    of its protocol, and the windows [B, 3, H, W] the trunk ran on (``Tower.head`` binds them)."""

    prototypes: torch.Tensor
    logit_scale: float
    images: torch.Tensor | None = None

    def on(self, images: torch.Tensor) -> SemanticFeedback:
        return SemanticFeedback(self.prototypes, self.logit_scale, images)

    def labels(self, tower: Tower, patches: torch.Tensor, grid: tuple[int, int], temp_thd: float) -> torch.Tensor:
        """[B, h', w'] patch labels (``patch_labels``) of the windows from the first pass's patch tokens
        [B, h'w', C], one window at a time as upstream (a window's upsampled logits are Q·H·W values)."""
        feats = tower.final(patches)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = (feats @ self.prototypes.T.to(feats.dtype)).transpose(1, 2).reshape(feats.shape[0], -1, *grid)
        return torch.cat([patch_labels(self._probabilities(logits[i:i + 1], self.images[i:i + 1]), temp_thd,
                                       tower.patch_size, grid) for i in range(len(logits))])

    def _probabilities(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """[1, Q, H, W] query probabilities of one window image [1, 3, H, W] from its cosine logits
        [1, Q, h', w']: upsampled to the window, PAMR (10 iterations, dilations 8 and 16, in fp32 on
        the window), softmax(logit_scale · L) over the queries (``create_logit_temp``)."""
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        iters, dilations = FIRST_PASS_PAMR
        slab = per_slab(image.shape[-2] * image.shape[-1])
        logits = pamr(image, logits, iters, dilations, queries_per_slab=slab).to(logits.dtype)
        return torch.softmax(logits * self.logit_scale, dim=1)


def patch_labels(probs: torch.Tensor, temp_thd: float, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """[B, h', w'] long: each patch's most frequent pixel label (the smallest among ties), a pixel's
    label its most probable query, 0 where that probability is below ``temp_thd``
    (``create_patch_matrix``; pixels beyond the grid's h'·p × w'·p are dropped, as ``unfold`` does)."""
    top, labels = probs.max(dim=1)
    labels = labels.masked_fill(top < temp_thd, 0)
    h, w = grid
    cells = labels[:, :h * patch, :w * patch].reshape(-1, h, patch, w, patch).transpose(2, 3).reshape(-1, h, w,
                                                                                                     patch * patch)
    counts = torch.zeros(*cells.shape[:-1], probs.shape[1], dtype=torch.int32, device=cells.device)
    counts.scatter_add_(-1, cells, torch.ones_like(cells, dtype=torch.int32))
    return counts.argmax(dim=-1)


def _same_entity(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, N] bool, [N, N] long) for one grid of patch labels [h', w']: whether the label stays the
    start's along the straight line from patch i towards patch j, and their Chebyshev distance.

    As ``check_path``: the line is sampled at t = k / max_steps for k = 0..steps(i, j) (max_steps the
    largest distance on the grid, so a short pair's samples cover only the first steps/max_steps of
    its line) and rounded half to even."""
    h, w = labels.shape
    n = h * w
    index = torch.arange(n, device=labels.device)
    coords = torch.stack((index // w, index % w), dim=-1)
    steps = (coords[None, :] - coords[:, None]).abs().amax(dim=-1)
    max_steps = int(steps.max())
    t = torch.linspace(0, 1, steps=max_steps + 1, device=labels.device).view(1, 1, -1, 1)
    sampled = torch.arange(max_steps + 1, device=labels.device)
    rows = max(1, _PATH_CHUNK_SAMPLES // (n * (max_steps + 1)))  # starts per chunk: bounds the samples held
    valid = []
    for first in range(0, n, rows):
        start = coords[first:first + rows, None, None]                      # [r, 1, 1, 2]
        along = (start * (1 - t) + coords[None, :, None] * t).round().long()  # [r, n, S, 2]
        same = labels[along[..., 0], along[..., 1]] == labels.flatten()[first:first + rows, None, None]
        counted = sampled <= steps[first:first + rows, :, None]
        valid.append((same | ~counted).all(dim=-1))
    return torch.cat(valid), steps


def feedback_prior(labels: torch.Tensor, same_entity: bool, prefix_tokens: int) -> torch.Tensor:
    """[T, T] fp32 SFR prior of one grid of patch labels [h', w'] (``generate_attention_sfr``):
    1 between patches of one label; with ``same_entity``, a pair whose connecting line leaves the
    label is decayed by exp(−distance / max distance); each row then smoothed by a 1-D Gaussian
    (σ = 5, over the raster order of the patches, as released), clipped at 0 and normalised to
    sum 1. The prefix tokens' rows and columns are 0."""
    flat = labels.flatten()
    n = flat.numel()
    prior = (flat[:, None] == flat[None, :]).float()
    if same_entity:
        valid, steps = _same_entity(labels)
        prior = torch.where(valid, prior, prior * torch.exp(-steps / steps.max()))
    size = min(n, int(6 * SFR_STD + 1))
    size = size if size % 2 == 1 else size + 1
    offsets = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(offsets ** 2) / (2 * SFR_STD ** 2))
    kernel = kernel / kernel.sum()
    blurred = F.relu(F.conv1d(prior.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2).squeeze(1))
    full = torch.zeros(n + prefix_tokens, n + prefix_tokens, device=labels.device)
    full[prefix_tokens:, prefix_tokens:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return full


def sfr_prior(labels: torch.Tensor, same_entity: bool, prefix_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, T] priors of patch labels [B, h', w'], each divided by its maximum and rounded
    through fp16 (the released ``attn_sfr.to(torch.float16)``), in ``dtype``."""
    priors = torch.stack([feedback_prior(one, same_entity, prefix_tokens) for one in labels])
    priors = priors / priors.amax(dim=(-1, -2), keepdim=True)
    return priors.half().to(dtype)[:, None]


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class ResCLIPHost(Method):
    """A method ResCLIP can switch on. Its ``attention(block, q, k, before_softmax, after_softmax,
    prefix_tokens, grid)`` gives the last block's weights [B, heads, T, T] from its queries and keys,
    applying ``before_softmax`` to each logit map and ``after_softmax`` to the weights; ``block_form``
    says whether the block keeps its residual and MLP ('vanilla', SCLIP) or not ('reduced')."""

    Config = ResCLIPConfig
    block_form: ClassVar[str] = "reduced"

    @property
    def needs_hidden_states(self) -> bool:  # RCS reads blocks 6..9
        return self.config.resclip

    @property
    def needs_feedback(self) -> bool:  # SFR's first pass
        return self.config.resclip

    @abc.abstractmethod
    def attention(self, block: AttentionBlock, q: torch.Tensor, k: torch.Tensor, before_softmax: Hook,
                  after_softmax: Hook, prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
        """The last block's weights [B, heads, T, T] from its queries and keys [B, heads, T, d]."""

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        block = tower.block(-1, grid)
        q, k, v = block.qkv(block.norm(x))
        if self.config.resclip:
            return self._resclip_block(tower, block, x, q, k, v, hidden, grid, info, feedback)
        weights = self.attention(block, q, k, _unchanged, _unchanged, tower.prefix_tokens, grid)
        keep_attention(info, weights)
        return finish_block(block, x, weights @ v, self.block_form, tower.prefix_tokens)

    def _resclip_block(self, tower: Tower, block: AttentionBlock, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, hidden: list[torch.Tensor], grid: tuple[int, int], info: dict | None,
                       feedback: SemanticFeedback | None) -> torch.Tensor:
        """A first pass with RCS, its segmentation of the windows, then the block with the SFR
        prior (on each logit map, before the softmax) and RCS (``VisionTransformer.forward``); both
        passes attend with the one q, k, v of the last block's input x."""
        if feedback is None or feedback.images is None:
            raise ValueError(f"resclip=True needs the text prototypes and the windows for its first pass: run "
                             f"{self.name} with resclip through pearl.Segmentor")
        config = self.config
        rcs = rcs_attention(tower, hidden, grid)

        def with_rcs(weights: torch.Tensor) -> torch.Tensor:
            return mix(weights, rcs, config.resclip_rcs_tau, config.resclip_rcs_lambda)

        weights = self.attention(block, q, k, _unchanged, with_rcs, tower.prefix_tokens, grid)
        first = finish_block(block, x, weights @ v, self.block_form, tower.prefix_tokens)
        labels = feedback.labels(tower, first, grid, config.resclip_temp_thd)
        prior = sfr_prior(labels, config.resclip_same_entity, tower.prefix_tokens, x.dtype)

        def with_sfr(logits: torch.Tensor) -> torch.Tensor:
            return mix(logits, prior, config.resclip_sfr_tau, config.resclip_sfr_lambda)

        weights = self.attention(block, q, k, with_sfr, with_rcs, tower.prefix_tokens, grid)
        keep_attention(info, weights)
        return finish_block(block, x, weights @ v, self.block_form, tower.prefix_tokens)
