"""GEM (Grounding Everything): a self-self attention path (q-q, k-k and v-v attention, iteratively
normalised, with an adaptive temperature) in place of the last block's attention.

As the SCLIP-family tables run it: mc-lan/ClearCLIP@ad68a40 ``clearclip_segmentor.py`` with
model_type='GEM' builds ``gem.create_gem_model`` (WalBouss/GEM@5fa677c ``gem_torch``, vendored as
``gem/gem_utils.py`` ``SelfSelfAttention``, ``GEMResidualBlock``, ``modified_vit_forward``) with
ignore_residual=True, depth 7, one iteration, the adaptive temperature; ClearCLIP's segmentor
quirks and settings; docs/methods.md §5.2. Its positions are resampled to the grid by size with
antialiasing (``resample_abs_pos_embed``), not by the "+0.1" scale factor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import default
from . import register
from .base import ClearCLIPSegmentorMethod, keep_attention


@dataclass(frozen=True)
class GEMConfig:
    iters: int = default("gem_iters")
    temperature: float = default("gem_temperature")
    residual: bool = default("gem_residual")
    depth: int = default("gem_depth")


def _self_attention(unit: torch.Tensor, inv_temp: torch.Tensor) -> torch.Tensor:
    """softmax(inv_temp · x̂ x̂ᵀ) [B, heads, T, T] of row-normalised tokens x̂ [B, heads, T, d]."""
    return torch.softmax((unit @ unit.transpose(-1, -2)) * inv_temp, dim=-1)


def self_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_temp: torch.Tensor, iters: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads' output [B, heads, T, d], the mean of the three attention maps) of GEM's
    ``SelfSelfAttention``: each of v, k, q refined ``iters`` times by its own self-attention
    (x ← softmax(τ x̂ x̂ᵀ) x, renormalised each time), then each one's map assigns v; the three
    outputs are averaged."""
    maps = []
    for x in (v, k, q):  # upstream's order: xs1 = v, xs2 = k, xs3 = q
        for _ in range(iters):
            unit = F.normalize(x, dim=-1)
            x = _self_attention(unit, inv_temp) @ unit
        maps.append(_self_attention(F.normalize(x, dim=-1), inv_temp))
    out = (maps[0] @ v + maps[1] @ v + maps[2] @ v) / 3
    return out, (maps[0] + maps[1] + maps[2]) / 3


@register
class GEM(ClearCLIPSegmentorMethod):
    name = "gem"
    Config = GEMConfig
    config_prefix = "gem_"
    position_interpolation = "size_antialias"

    @property
    def needs_hidden_states(self) -> bool:  # the summed path starts at the input of its first block
        return self.config.residual

    def _path_output(self, block, x: torch.Tensor, info: dict | None) -> torch.Tensor:
        """GEM's attention output of ``block`` on its input x [B, T, C], projected, [B, T, C]."""
        y = block.norm(x)
        q, k, v = block.qkv(y)
        if self.config.temperature > 0:
            inv_temp = torch.tensor(self.config.temperature, dtype=y.dtype, device=y.device)
        else:  # upstream: mean over tokens of ‖ln_1(x)‖, times the head scale, per image
            inv_temp = y.norm(dim=-1).mean(dim=-1)[:, None, None, None] * block.scale
        out, weights = self_self_attention(q, k, v, inv_temp, self.config.iters)
        keep_attention(info, weights)
        return block.attention_scale(block.project(out))  # GEMResidualBlock applies ls_1 too

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        if not self.config.residual:  # ignore_residual: each GEM block's output replaces the path's
            return self._path_output(tower.block(-1, grid), x, info)[:, tower.prefix_tokens:]
        first = tower.num_blocks - (self.config.depth - 1)
        if first < 1:
            raise ValueError(f"gem_depth={self.config.depth} wraps more blocks than the model's {tower.num_blocks}")
        inputs = hidden[first - 1:]  # the original path's input of blocks first … L−1 (the last one's is x)
        path = inputs[0]
        for index, block_input in zip(range(first, tower.num_blocks), inputs):
            block = tower.block(index, grid)
            path = path + self._path_output(block, block_input, info if index == tower.num_blocks - 1 else None)
        return path[:, tower.prefix_tokens:]
