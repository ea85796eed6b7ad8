"""SCLIP: correlative self-attention softmax(s·q qᵀ) + softmax(s·k kᵀ), residual and MLP kept.

wangf3014/SCLIP@b56bd30 ``clip/model.py`` (``custom_attn(csa=True)``); docs/methods.md §3. The two
maps are summed, not averaged (rows sum to 2); products are formed before the scale.
"""
import torch

from . import register
from .base import Method, finish_block, keep_attention


@register
class SCLIP(Method):
    name = "sclip"

    def last_block(self, tower, x, hidden, grid, info):
        block = tower.block(-1, grid)
        q, k, v = block.qkv(block.norm(x))
        scale = block.scale
        attn = torch.softmax((q @ q.transpose(-1, -2)) * scale, dim=-1) \
            + torch.softmax((k @ k.transpose(-1, -2)) * scale, dim=-1)
        keep_attention(info, attn)
        return finish_block(block, x, attn @ v, "vanilla", tower.prefix_tokens)
