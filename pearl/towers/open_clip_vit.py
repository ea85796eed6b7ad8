"""open_clip's ``VisionTransformer`` (OpenAI and LAION ViTs): CLS token first, pre-norm
``ResidualAttentionBlock``s with ``nn.MultiheadAttention``.

We hook open_clip's own modules (``conv1``, ``class_embedding``, ``positional_embedding``,
``ln_pre``, ``transformer.resblocks``, ``ln_post``, ``proj``) rather than vendoring a CLIP copy;
docs/engineering.md §1.4. Tokens are NLD (batch first), as in open_clip ≥ 2.26.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from ..preprocess import Normalisation, model_normalisation
from . import register
from .base import POSITIONS, AttentionBlock, Tower, pair, resample_positions


def positional_embedding(visual, grid_h: int, grid_w: int, positions: str = POSITIONS[0]) -> torch.Tensor:
    """[1 + h'w', C] positional embedding of an open_clip ViT for an h'×w' grid, fp32
    (``resample_positions``: its CLS entry first, then the native grid)."""
    return resample_positions(visual.positional_embedding, 1, pair(visual.grid_size), (grid_h, grid_w), positions)


class OpenClipBlock(AttentionBlock):
    """open_clip's ``ResidualAttentionBlock``: ln_1, packed in_proj (with bias), out_proj, ls_1/ls_2."""

    def __init__(self, module) -> None:
        self.module = module
        self.heads = module.attn.num_heads
        self.scale = (module.attn.embed_dim // self.heads) ** -0.5

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.ln_1(x)

    def qkv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = self.module.attn
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        batch, tokens, width = y.shape

        def to_heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

        return to_heads(q), to_heads(k), to_heads(v)

    def project(self, heads_out: torch.Tensor) -> torch.Tensor:
        batch, heads, tokens, dim = heads_out.shape
        return self.module.attn.out_proj(heads_out.transpose(1, 2).reshape(batch, tokens, heads * dim))

    def attention_scale(self, attended: torch.Tensor) -> torch.Tensor:
        return self.module.ls_1(attended)

    def mlp_residual(self, y: torch.Tensor) -> torch.Tensor:
        block = self.module
        return y + block.ls_2(block.mlp(block.ln_2(y)))

    def is_plain(self) -> bool:
        """Whether the module is open_clip's own batch-first ``ResidualAttentionBlock`` without cross
        attention, whose forward ``__call__`` computes itself."""
        block = self.module
        return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
                and getattr(block.attn, "batch_first", False))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip ``ResidualAttentionBlock.forward`` (no mask) for x [B, T, C], its attention one call
        of ``F.scaled_dot_product_attention``: on a CPU ``nn.MultiheadAttention``'s inference fast path
        forms the [B, heads, T, T] weights with separate matmuls and softmax; SDPA does not (fp32, equal
        to about 3e−6; blocks 1…11 of ViT-B/16 7–10 % faster on a CPU, docs/speed.md §2). Any other
        block (a subclass, cross attention) runs its own forward."""
        if not self.is_plain():
            return self.module(x)
        q, k, v = self.qkv(self.norm(x))
        x = self.attention_residual(x, self.project(F.scaled_dot_product_attention(q, k, v)))
        return self.mlp_residual(x)


@register
class OpenClipViT(Tower):
    name = "open_clip_vit"

    @classmethod
    def matches(cls, visual) -> bool:
        # attention pooling (CoCa) and towers without a CLS token pool differently: not this family
        return (isinstance(visual, VisionTransformer) and visual.class_embedding is not None
                and getattr(visual, "attn_pool", None) is None)

    @property
    def patch_size(self) -> int:
        return pair(self.visual.patch_size)[0]

    @property
    def prefix_tokens(self) -> int:
        return 1

    @property
    def has_cls(self) -> bool:
        return True

    @property
    def num_blocks(self) -> int:
        return len(self.visual.transformer.resblocks)

    @property
    def normalisation(self) -> Normalisation:
        return model_normalisation(self.visual)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def embed(self, images: torch.Tensor, positions: str = POSITIONS[0]) -> tuple[torch.Tensor, tuple[int, int]]:
        visual = self.visual
        x = visual.conv1(images.to(self.dtype))
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + positional_embedding(visual, *grid, positions).to(x.dtype)
        x = visual.patch_dropout(x)
        return visual.ln_pre(x), grid

    def block(self, index: int, grid: tuple[int, int]) -> OpenClipBlock:
        return OpenClipBlock(self.visual.transformer.resblocks[index])

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(tokens)

    def final(self, patches: torch.Tensor) -> torch.Tensor:
        feats = self.final_norm(patches)
        return feats @ self.visual.proj if self.visual.proj is not None else feats
