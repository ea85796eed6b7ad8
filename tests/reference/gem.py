"""GEM's self-self attention transcribed from WalBouss/GEM@5fa677c ``gem_torch/gem_utils.py``
(``SelfSelfAttention.forward``, ``GEMResidualBlock``) as mc-lan/ClearCLIP@ad68a40 vendors it, for
the tiny test model (2 heads of 32 dims); test-side, independent of pearl/methods/gem.py."""
import torch
import torch.nn.functional as F

HEADS = 2


def self_self_attention(block, x, iters=1, temperature=None):
    """The GEM path's residual of ``block`` (attention output, projected) for its input x [B, N, C]."""
    y = block.ln_1(x)
    B, N, C = y.shape
    qkv = (y @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).reshape(B, N, 3, HEADS, C // HEADS)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    scale = (C // HEADS) ** -0.5
    if temperature is None:
        inv_temp = torch.norm(y, dim=-1).mean(dim=-1, keepdim=True).unsqueeze(1).unsqueeze(-1) * scale
    else:
        inv_temp = temperature
    xs1, xs2, xs3 = v, k, q
    for _ in range(iters):
        xs1, xs2, xs3 = F.normalize(xs1, dim=-1), F.normalize(xs2, dim=-1), F.normalize(xs3, dim=-1)
        attn1 = ((xs1 @ xs1.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
        attn2 = ((xs2 @ xs2.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
        attn3 = ((xs3 @ xs3.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
        xs1, xs2, xs3 = attn1 @ xs1, attn2 @ xs2, attn3 @ xs3
    xs1, xs2, xs3 = F.normalize(xs1, dim=-1), F.normalize(xs2, dim=-1), F.normalize(xs3, dim=-1)
    attn1 = ((xs1 @ xs1.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
    attn2 = ((xs2 @ xs2.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
    attn3 = ((xs3 @ xs3.transpose(-2, -1)) * inv_temp).softmax(dim=-1)
    xs = (attn1 @ v + attn2 @ v + attn3 @ v) / 3
    out = xs.transpose(1, 2).reshape(B, N, C)
    return out @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def gem_path(model, hidden, depth=7, ignore_residual=True, **kwargs):
    """x_gem after the last block: GEMResidualBlock over the last depth − 1 blocks, each fed the
    original path's input (hidden[j − 1] is block j's input), [B, T, C] before ln_post."""
    blocks = model.visual.transformer.resblocks
    first = len(blocks) - (depth - 1)
    x_gem = hidden[first - 1]
    for index in range(first, len(blocks)):
        residual = self_self_attention(blocks[index], hidden[index - 1], **kwargs)
        x_gem = residual if ignore_residual else x_gem + residual
    return x_gem
