"""PEARL: Procrustes-aligned attention in a reduced last block (docs/pearl.md §2).

PGSmall/PEARL@c26062b ``clip/model.py`` (``custom_attn``) and ``pearl/attn.py`` (``pa_attn``).
``pa=False`` is the released ``--attn vanilla`` switch: plain q·k attention, block still reduced.
"""
from . import register
from .base import AttentionConfig, Method, query_key_block


@register
class Pearl(Method):
    Config = AttentionConfig
    name = "pearl"
    whole_upsample_via_input = True

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        return query_key_block(tower, x, grid, self.config, info)
