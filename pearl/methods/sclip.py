"""SCLIP: correlative self-attention softmax(s·q qᵀ) + softmax(s·k kᵀ), residual and MLP kept.

wangf3014/SCLIP@b56bd30 ``clip/model.py`` (``custom_attn(csa=True)``); docs/methods.md §3. The two
maps are summed, not averaged (rows sum to 2); products are formed before the scale. A ResCLIP
host (``resclip=true``: its ``attn_strategy='sclip'``, SFR on both maps; docs/methods.md §10).
"""
import torch

from . import register
from .resclip import ResCLIPHost


@register
class SCLIP(ResCLIPHost):
    name = "sclip"
    block_form = "vanilla"

    def attention(self, block, q, k, before_softmax, after_softmax, prefix_tokens, grid):
        scale = block.scale
        weights = torch.softmax(before_softmax((q @ q.transpose(-1, -2)) * scale), dim=-1) \
            + torch.softmax(before_softmax((k @ k.transpose(-1, -2)) * scale), dim=-1)
        return after_softmax(weights)
