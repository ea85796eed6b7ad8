"""MaskCLIP: the last block's attention dropped, each token's value embedding through the output
projection, in a reduced block (no residual, no FFN).

As the SCLIP-family tables run it: mc-lan/ClearCLIP@ad68a40 ``open_clip/transformer.py``
``custom_attn`` with model_type='MaskCLIP' (a softmax over a mask that is 0 on the diagonal and −∞
elsewhere, i.e. the identity, times v), ignore_residual=True, under ``clearclip_segmentor.py``
(padded crops, the canvas in the model dtype); docs/methods.md §5.1. chongzhou96/MaskCLIP@245d31f is
the original (its key smoothing and prompt denoising are not part of this form).
"""
from . import register
from .base import ClearCLIPSegmentorMethod, value_block


@register
class MaskCLIP(ClearCLIPSegmentorMethod):
    name = "maskclip"

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        return value_block(tower, x, grid, "reduced", info)
