"""ClearCLIP: softmax(s·q qᵀ) attention in a reduced block (no residual, no FFN).

mc-lan/ClearCLIP@ad68a40 ``open_clip/transformer.py`` with model_type='ClearCLIP',
ignore_residual=True (docs/methods.md §5). Crops are padded to a multiple of the patch size and the
window canvas is kept in the model dtype, as ``clearclip_segmentor.py`` does. A ResCLIP host
(``resclip=true``: its ``attn_strategy='clearclip'``; docs/methods.md §10).
"""
import torch

from . import register
from .base import ClearCLIPSegmentorMethod
from .resclip import ResCLIPHost


@register
class ClearCLIP(ClearCLIPSegmentorMethod, ResCLIPHost):
    name = "clearclip"

    def attention(self, block, q, k, before_softmax, after_softmax, prefix_tokens, grid):
        return after_softmax(torch.softmax(before_softmax((q @ q.transpose(-1, -2)) * block.scale), dim=-1))
