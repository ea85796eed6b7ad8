"""Vanilla CLIP dense features: the full last block (residual and MLP kept).

Architecture as PGSmall/PEARL and sinahmr/NACLIP ``clip/model.py`` with arch='vanilla',
attn_strategy='vanilla' (docs/methods.md §2). ``pa=True`` swaps in Procrustes-aligned attention.
"""
from . import register
from .base import AttentionConfig, Method, query_key_block


@register
class Vanilla(Method):
    Config = AttentionConfig
    name = "vanilla"
    whole_upsample_via_input = True  # its protocol is PEARL's (NACLIP-style) segmentor

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        return query_key_block(tower, x, grid, self.config, info)
