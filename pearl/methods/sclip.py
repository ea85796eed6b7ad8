"""SCLIP: correlative self-attention softmax(s·q qᵀ) + softmax(s·k kᵀ), residual and MLP kept.

wangf3014/SCLIP@b56bd30 ``clip/model.py`` (``custom_attn(csa=True)``); docs/methods.md §3. The two
maps are summed, not averaged (rows sum to 2); products are formed before the scale.
"""
import torch

from ..blocks import head_scale, keep_attention, split_heads
from . import register
from .base import Method, finish_block


@register
class SCLIP(Method):
    name = "sclip"

    def last_block(self, blocks, x, hidden, grid, info):
        block = blocks[-1]
        q, k, v = split_heads(block, block.ln_1(x))
        scale = head_scale(block)
        attn = torch.softmax((q @ q.transpose(-1, -2)) * scale, dim=-1) \
            + torch.softmax((k @ k.transpose(-1, -2)) * scale, dim=-1)
        keep_attention(info, attn)
        return finish_block(block, x, attn @ v, "vanilla")
