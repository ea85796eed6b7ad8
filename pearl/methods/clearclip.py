"""ClearCLIP: softmax(s·q qᵀ) attention in a reduced block (no residual, no FFN).

mc-lan/ClearCLIP@ad68a40 ``open_clip/transformer.py`` with model_type='ClearCLIP',
ignore_residual=True (docs/methods.md §5). Crops are padded to a multiple of the patch size and the
window canvas is kept in the model dtype, as ``clearclip_segmentor.py`` does.
"""
import torch

from . import register
from .base import ClearCLIPSegmentorMethod, finish_block, keep_attention


@register
class ClearCLIP(ClearCLIPSegmentorMethod):
    name = "clearclip"

    def last_block(self, tower, x, hidden, grid, info):
        block = tower.block(-1, grid)
        q, _, v = block.qkv(block.norm(x))
        attn = torch.softmax((q @ q.transpose(-1, -2)) * block.scale, dim=-1)
        keep_attention(info, attn)
        return finish_block(block, x, attn @ v, "reduced", tower.prefix_tokens)
