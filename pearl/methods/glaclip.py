"""GLA-CLIP: ProxyCLIP's proxy attention extended over every window of the image (each patch attends
to the patches of all windows), on proxy anchors, with a per-token normalisation whose strength grows
with the window count and shrinks with an anchor's support.

2btlFe/GLA-CLIP@ba74915, docs/methods.md §14: ``gla_clip_segmentor.py`` ``forward_kv_expansion`` (all
windows of the image in one forward), ``open_clip/transformer.py`` ``Custom_Attn_Model_Type`` and
``myutils.py`` ``KV_Extension`` under the flags of its ``predict.sh`` (``--CLIP_type ProxyCLIP
--token_norm --KV_token_extension --proxy_sim --mini_iters 2 --dynamic_beta --beta_alpha 0.3
--dynamic_gamma --gamma_alpha 30``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import default
from . import register
from .base import keep_attention
from .proxyclip import ProxyCLIP, values_on_grid

ROWS_PER_CHUNK = 2048  # query patches whose [rows, all patches] similarities are held at once


@dataclass(frozen=True)
class GLACLIPConfig:
    across_windows: bool = default("glaclip_across_windows")
    anchors: bool = default("glaclip_anchors")
    anchor_iters: int = default("glaclip_anchor_iters")
    anchor_threshold: float = default("glaclip_anchor_threshold")
    beta: float = default("glaclip_beta")
    gamma: float = default("glaclip_gamma")
    dynamic_beta: bool = default("glaclip_dynamic_beta")
    beta_alpha: float = default("glaclip_beta_alpha")
    dynamic_gamma: bool = default("glaclip_dynamic_gamma")
    gamma_alpha: float = default("glaclip_gamma_alpha")
    cut: float = default("glaclip_cut")
    temperature: float = default("glaclip_temperature")


def anchored_similarity(keys: torch.Tensor, rows: slice, config: GLACLIPConfig
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([R, N] similarities of the query patches ``rows`` to all N unit ``keys`` [N, C], [R, 1] each
    query's anchor support or None). With ``anchors`` (``proxy_sim``) each query becomes the normalised
    mean of the keys more similar to it than ``anchor_threshold``, ``anchor_iters`` times (a row left
    empty keeps its own patch), and its similarities are its anchor's; the support is the last
    iteration's member count (``KV_Extension.forward``; every row is computed on its own there too)."""
    queries = keys[rows]
    if not (config.anchors or config.dynamic_gamma):
        return queries @ keys.T, None
    anchored = F.normalize(queries, dim=-1) @ keys.T
    if config.anchor_iters == 0:
        members = (anchored > config.anchor_threshold).to(keys.dtype)
    for _ in range(config.anchor_iters):
        members = (anchored > config.anchor_threshold).to(keys.dtype)
        empty = (members.sum(dim=-1) == 0).nonzero()[:, 0]
        members[empty, empty + rows.start] = 1
        count = members.sum(dim=-1, keepdim=True)
        anchored = F.normalize((members @ keys) / (count + 1e-6), dim=-1) @ keys.T
    similarity = anchored if config.anchors else queries @ keys.T
    return similarity, members.sum(dim=-1, keepdim=True)


def normalised_attention(similarity: torch.Tensor, support: torch.Tensor | None, windows: int,
                         config: GLACLIPConfig) -> torch.Tensor:
    """[R, N]: L = (S − β·max(0, mean S))·γ per query row, its entries below min(row max, ``cut``) −∞, then
    softmax over the keys of L / temperature. β = 1 + α_β·ln(1 + windows) when ``dynamic_beta``,
    γ = 1 + α_γ / support when ``dynamic_gamma`` (``KV_Extension`` with ``token_norm``)."""
    beta = 1 + config.beta_alpha * math.log1p(windows) if config.dynamic_beta else config.beta
    gamma = 1 + config.gamma_alpha / support if config.dynamic_gamma else config.gamma
    mean = similarity.mean(dim=-1, keepdim=True).clamp_min(0)
    logits = (similarity - mean * beta) * gamma
    threshold = torch.minimum(logits.amax(dim=-1, keepdim=True), torch.tensor(config.cut, dtype=logits.dtype,
                                                                                device=logits.device))
    logits = logits.masked_fill(logits < threshold, float("-inf"))
    return torch.softmax(logits / config.temperature, dim=-1)


def extended_attention(features: torch.Tensor, values: torch.Tensor, config: GLACLIPConfig,
                       keep: list | None = None) -> torch.Tensor:
    """[W, heads, S, d]: every patch of the W windows attending over the patches of all of them, from the
    vision model's features [W, I, J, C] (S = I·J) and CLIP's values on its grid [W, heads, S, d];
    computed ``ROWS_PER_CHUNK`` query rows at a time. ``keep`` (a list) receives the [W·S, W·S] weights."""
    windows, heads, tokens, dim = values.shape
    keys = F.normalize(features.reshape(windows * tokens, -1), dim=-1)
    flat_values = values.transpose(0, 1).reshape(heads, windows * tokens, dim)
    out = torch.empty(heads, windows * tokens, dim, dtype=values.dtype, device=values.device)
    for start in range(0, windows * tokens, ROWS_PER_CHUNK):
        rows = slice(start, min(start + ROWS_PER_CHUNK, windows * tokens))
        similarity, support = anchored_similarity(keys, rows, config)
        weights = normalised_attention(similarity, support, windows, config).to(values.dtype)
        out[:, rows] = weights @ flat_values
        if keep is not None:
            keep.append(weights)
    return out.reshape(heads, windows, tokens, dim).transpose(0, 1)


@register
class GLACLIP(ProxyCLIP):
    """ProxyCLIP's vision input, padding (forward_kv_expansion: compute_padsize(H, W, 56)) and output grid,
    with its own last block."""

    name = "glaclip"
    Config = GLACLIPConfig
    config_prefix = "glaclip_"
    attends_across_windows = True

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        """All windows of one image (the trunk's batch, in window order; ``attends_across_windows``), or
        each window alone without ``across_windows``."""
        if feedback is None:
            raise ValueError("glaclip's last block needs the vision model's features of the windows")
        block = tower.block(-1, grid)
        _, _, v = block.qkv(block.norm(x))
        values = values_on_grid(v[:, :, tower.prefix_tokens:], grid, self.output_grid(grid, feedback))
        keep = [] if info is not None else None
        groups = [slice(0, len(x))] if self.config.across_windows else [slice(i, i + 1) for i in range(len(x))]
        out = torch.cat([extended_attention(feedback[group], values[group], self.config, keep) for group in groups])
        if keep is not None and len(groups) == 1:
            weights = torch.cat(keep)  # [W·S, W·S]: each window's rows over all windows' patches
            keep_attention(info, weights.reshape(len(x), -1, weights.shape[-1])[:, None].expand(-1, v.shape[1], -1, -1))
        return block.project(out)
