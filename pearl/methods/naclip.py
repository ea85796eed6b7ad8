"""NACLIP: softmax(s·k kᵀ + Ω) in a reduced block, Ω a Gaussian neighbourhood bias.

sinahmr/NACLIP@0cac3a6 ``clip/model.py`` (arch='reduced', attn_strategy='naclip'); docs/methods.md §4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blocks import head_scale, keep_attention, split_heads
from ..params import default
from . import register
from .base import Method, finish_block


def neighbourhood_bias(grid_h: int, grid_w: int, std: float) -> torch.Tensor:
    """Ω [1 + h'w', 1 + h'w'] (fp32): exp(−‖p − p'‖² / 2σ²) between patch grid positions.

    Row and column 0 (CLS) are zero. Upstream convolves one-hot maps with a (2h'−1)×(2w'−1)
    Gaussian window; this closed form is the same matrix.
    """
    rows = torch.arange(grid_h, dtype=torch.float32).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32).repeat(grid_h)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    omega = torch.zeros(grid_h * grid_w + 1, grid_h * grid_w + 1)
    omega[1:, 1:] = torch.exp(-dist2 / (2 * std ** 2))
    return omega


@dataclass(frozen=True)
class NACLIPConfig:
    gauss_std: float = default("naclip_gauss_std")


@register
class NACLIP(Method):
    name = "naclip"
    whole_upsample_via_input = True

    Config = NACLIPConfig
    config_prefix = "naclip_"

    def __init__(self, config: NACLIPConfig | None = None) -> None:
        super().__init__(config)
        self._bias_cache: dict = {}

    def _bias(self, grid, std, like: torch.Tensor) -> torch.Tensor:
        key = (grid, std, like.dtype, like.device)
        if key not in self._bias_cache:
            self._bias_cache[key] = neighbourhood_bias(*grid, std).to(device=like.device, dtype=like.dtype)
        return self._bias_cache[key]

    def last_block(self, blocks, x, hidden, grid, info):
        block = blocks[-1]
        _, k, v = split_heads(block, block.ln_1(x))
        logits = (k @ k.transpose(-1, -2)) * head_scale(block) + self._bias(grid, self.config.gauss_std, k)
        weights = torch.softmax(logits, dim=-1)
        keep_attention(info, weights)
        return finish_block(block, x, weights @ v, "reduced")
