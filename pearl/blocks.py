"""Pieces of an open_clip ``ResidualAttentionBlock`` that the methods' last blocks reuse.

A leaf module: the methods import it, and the backbone imports the methods (never the reverse).
Tokens are NLD (batch first), as in open_clip ≥ 2.26.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock


def split_heads(block, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, heads, T, d] of ``block``'s in_proj (with bias) applied to ``y`` = ln_1(x)."""
    attn = block.attn
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    batch, tokens, width = y.shape
    heads = attn.num_heads

    def to_heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)

    return to_heads(q), to_heads(k), to_heads(v)


def merge_heads(block, out: torch.Tensor) -> torch.Tensor:
    """out_proj of heads [B, heads, T, d] → [B, T, C]."""
    batch, heads, tokens, dim = out.shape
    return block.attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * dim))


ATTENTION = "attention"  # the ``info`` key under which a last block returns its attention weights


def keep_attention(info: dict | None, weights: torch.Tensor) -> None:
    """Hand the last block's attention weights [B, heads, T, T] (rows = queries, CLS first) to the
    caller when it asked for them by putting the key ``ATTENTION`` into ``info``
    (``pearl.attention``); otherwise nothing is kept."""
    if info is not None and ATTENTION in info:
        info[ATTENTION] = weights.detach()


def head_scale(block) -> float:
    return (block.attn.embed_dim // block.attn.num_heads) ** -0.5


def mlp_residual(block, y: torch.Tensor) -> torch.Tensor:
    """y + MLP(LN2(y)) with open_clip's layer scale."""
    return y + block.ls_2(block.mlp(block.ln_2(y)))


def is_plain_block(block) -> bool:
    """Whether ``block`` is open_clip's own batch-first ``ResidualAttentionBlock`` without cross
    attention, whose forward ``plain_block`` computes."""
    return (type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
            and getattr(block.attn, "batch_first", False))


def plain_block(block, x: torch.Tensor) -> torch.Tensor:
    """open_clip ``ResidualAttentionBlock.forward`` (no mask) for x [B, T, C], its attention one call
    of ``F.scaled_dot_product_attention``: on a CPU ``nn.MultiheadAttention``'s inference fast path
    forms the [B, heads, T, T] weights with separate matmuls and softmax; SDPA does not (fp32, equal
    to about 3e−6; blocks 1…11 of ViT-B/16 7–10 % faster on a CPU, docs/speed.md §2)."""
    q, k, v = split_heads(block, block.ln_1(x))
    x = x + block.ls_1(merge_heads(block, F.scaled_dot_product_attention(q, k, v)))
    return mlp_residual(block, x)
