"""ClearCLIP: softmax(s·q qᵀ) attention in a reduced block (no residual, no FFN).

mc-lan/ClearCLIP@ad68a40 ``open_clip/transformer.py`` with model_type='ClearCLIP',
ignore_residual=True (docs/methods.md §5). Crops are padded to a multiple of the patch size and the
window canvas is kept in the model dtype, as ``clearclip_segmentor.py`` does.
"""
import torch

from ..blocks import head_scale, keep_attention, split_heads
from . import register
from .base import Method, finish_block


@register
class ClearCLIP(Method):
    name = "clearclip"
    pad_crops_to_patch = True
    fuse_in_model_dtype = True

    def last_block(self, blocks, x, hidden, grid, info):
        block = blocks[-1]
        q, _, v = split_heads(block, block.ln_1(x))
        attn = torch.softmax((q @ q.transpose(-1, -2)) * head_scale(block), dim=-1)
        keep_attention(info, attn)
        return finish_block(block, x, attn @ v, "reduced")
