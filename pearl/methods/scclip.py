"""SC-CLIP (Self-Calibrated CLIP): anomaly tokens resolved, intermediate-layer similarity for the
aggregation and the attention, and multi-level fusion through the last block.

SuleBai/SC-CLIP@0417ba9 ``clip/model.py`` (``VisionTransformer.forward``, ``custom_attn``) and
``scclip_segmentor.py``; docs/methods.md §9. Layer numbers x_ℓ are block outputs, 1-based; the
released code fixes them for a 12-block ViT (its pre/post/multi indices 8, 3, 3..10 are 0-based
into the list of block outputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import default
from ..towers.base import AttentionBlock
from . import calibration, register
from .base import Method, keep_attention

DEFAULT_LAYERS = (9, 4, 4, 10)  # similarity before the last block x9, after it x4, multi-level sum x4..x10


@dataclass(frozen=True)
class SCCLIPConfig:
    res_cls: float = default("scclip_res_cls")
    layers: tuple | None = default("scclip_layers")


def calibrated_attention(block: AttentionBlock, tokens: torch.Tensor, similarity_map: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_proj(A·v) [B, N, C], A [B, heads, N, N]) of the last block on patch tokens [B, N, C] with
    A = (similarity_map + softmax(s·k kᵀ)) / 2: SC-CLIP's ``custom_attn`` (no residual, no FFN)."""
    _, k, v = block.qkv(block.norm(tokens))
    attn = (similarity_map + torch.softmax((k @ k.transpose(-1, -2)) * block.scale, dim=-1)) / 2
    return block.project(attn @ v), attn


@register
class SCCLIP(Method):
    name = "scclip"
    needs_hidden_states = True
    reads_cls = "SC-CLIP reads the CLS token (its residual in the last block)"
    Config = SCCLIPConfig
    config_prefix = "scclip_"

    def last_block(self, tower, x, hidden, grid, info, feedback=None):
        self.check_tower(tower)
        pre, post, first, last = calibration.layer_map(self.config.layers, tower.num_blocks, DEFAULT_LAYERS,
                                                       "scclip_layers", "SC-CLIP")
        res_cls = self.config.res_cls
        block = tower.block(-1, grid)
        x_last = hidden[-1]
        # anomalies of x_{L−1}'s patches (the CLS stays out of the detection and the last block's attention)
        outliers = calibration.lof_outliers(x_last[:, 1:])

        def resolved(tokens: torch.Tensor) -> torch.Tensor:
            return calibration.purify(tokens[:, 1:], outliers, grid, guard=True)
        sim_pre = calibration.cosine_similarity(resolved(hidden[pre - 1]))
        similarity_map = calibration.similarity_attention(sim_pre)  # from the similarity before the 0.4 floor
        main = calibration.aggregate(calibration.floored(sim_pre), resolved(x_last))
        main, attn = calibrated_attention(block, main, similarity_map)
        keep_attention(info, attn)  # the main branch's; patch tokens only (no CLS row or column)
        main = main + res_cls * x_last[:, :1]

        layer_sum = sum(hidden[first - 1:last])  # as upstream: added one by one onto zeros
        multi, _ = calibrated_attention(block, layer_sum[:, 1:], similarity_map)
        multi = multi + res_cls * layer_sum[:, :1]

        sim_post = calibration.similarity(hidden[post - 1][:, 1:])
        return calibration.aggregate(sim_post, main) + calibration.aggregate(sim_post, multi)
