"""NACLIP: softmax(s·k kᵀ + Ω) in a reduced block, Ω a Gaussian neighbourhood bias.

sinahmr/NACLIP@0cac3a6 ``clip/model.py`` (arch='reduced', attn_strategy='naclip'); docs/methods.md §4.
The host ResCLIP's released code is built on (``resclip=true``: its ``attn_strategy='resclip'``, SFR
before Ω is added; docs/methods.md §10).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..params import default
from . import register
from .resclip import ResCLIPConfig, ResCLIPHost


def neighbourhood_bias(grid_h: int, grid_w: int, std: float, prefix_tokens: int = 1) -> torch.Tensor:
    """Ω [P + h'w', P + h'w'] (fp32): exp(−‖p − p'‖² / 2σ²) between patch grid positions.

    The rows and columns of the P prefix tokens (CLS) are zero. Upstream convolves one-hot maps with a (2h'−1)×(2w'−1)
    Gaussian window; this closed form is the same matrix.
    """
    rows = torch.arange(grid_h, dtype=torch.float32).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32).repeat(grid_h)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    omega = torch.zeros(grid_h * grid_w + prefix_tokens, grid_h * grid_w + prefix_tokens)
    omega[prefix_tokens:, prefix_tokens:] = torch.exp(-dist2 / (2 * std ** 2))
    return omega


def neighbourhood_bias_like(grid: tuple[int, int], std: float, prefix_tokens: int, like: torch.Tensor
                            ) -> torch.Tensor:
    """``neighbourhood_bias`` in ``like``'s dtype and device, made once per grid (NACLIP, CASS)."""
    return _neighbourhood_bias_on(grid, std, prefix_tokens, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _neighbourhood_bias_on(grid: tuple[int, int], std: float, prefix_tokens: int, dtype: torch.dtype,
                           device: torch.device) -> torch.Tensor:
    return neighbourhood_bias(*grid, std, prefix_tokens).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class NACLIPConfig(ResCLIPConfig):
    gauss_std: float = default("naclip_gauss_std")


@register
class NACLIP(ResCLIPHost):
    name = "naclip"
    whole_upsample_via_input = True

    Config = NACLIPConfig
    config_prefix = "naclip_"

    def attention(self, block, q, k, before_softmax, after_softmax, prefix_tokens, grid):
        bias = neighbourhood_bias_like(grid, self.config.gauss_std, prefix_tokens, k)
        logits = before_softmax((k @ k.transpose(-1, -2)) * block.scale) + bias
        return after_softmax(torch.softmax(logits, dim=-1))
