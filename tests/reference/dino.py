"""Independent transcriptions of the released vision models' dense forward, for the tests: DINO's
``vision_transformer.py`` (facebookresearch/dino ``prepare_tokens``, ``interpolate_pos_encoding``,
``get_intermediate_layers``) and DINOv2's with registers (facebookresearch/dinov2
``prepare_tokens_with_masks``), written from those files on a state dict in their layout."""
import math

import torch
import torch.nn.functional as F


def _interpolate(pos: torch.Tensor, h: int, w: int, patch: int) -> torch.Tensor:
    """[1, 1 + h0·w0, C] from [1, 1 + N, C]: the stock table when the patch count is N and the input is
    square, else bicubic by the scale factor ((h0 + 0.1)/√N, (w0 + 0.1)/√N)."""
    npatch, n = (h // patch) * (w // patch), pos.shape[1] - 1
    if npatch == n and w == h:
        return pos
    side, dim = int(math.sqrt(n)), pos.shape[-1]
    h0, w0 = h // patch + 0.1, w // patch + 0.1
    grid = F.interpolate(pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2),
                         scale_factor=(h0 / side, w0 / side), mode="bicubic")
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _block(sd: dict, i: int, x: torch.Tensor, heads: int) -> torch.Tensor:
    p = f"blocks.{i}."
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[p + name + ".weight"], sd[p + name + ".bias"], eps=1e-6)
    y = ln(x, "norm1")
    b, t, c = y.shape
    qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(b, t, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = torch.softmax((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(b, t, c)
    def scaled(t, name):  # DINOv2's LayerScale
        return t * sd[p + name + ".gamma"] if p + name + ".gamma" in sd else t
    x = x + scaled(F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]), "ls1")
    y = ln(x, "norm2")
    y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x + scaled(y, "ls2")


def _prepared_tokens(sd: dict, images: torch.Tensor, patch: int, registers: int) -> torch.Tensor:
    b, _, h, w = images.shape
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
    x = x + _interpolate(sd["pos_embed"], h, w, patch)
    if registers:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
    return x


def dense_tokens(sd: dict, images: torch.Tensor, patch: int, heads: int, depth: int, registers: int = 0
                 ) -> torch.Tensor:
    """[B, h0·w0, C]: the last block's patch tokens through the final norm for images normalised with
    the model's statistics; ``registers`` > 0: DINOv2's register tokens after the CLS token, without
    positions (its ``sd`` holds ``register_tokens``)."""
    x = _prepared_tokens(sd, images, patch, registers)
    for i in range(depth):
        x = _block(sd, i, x, heads)
    x = F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return x[:, 1 + registers:]


def last_qkv(sd: dict, images: torch.Tensor, patch: int, heads: int, depth: int) -> torch.Tensor:
    """[B, T, 3C]: what a forward hook on the last block's ``attn.qkv`` receives as output (LPOSS's
    ``hook_fn_forward_qkv``), CLS first; DINO v1."""
    x = _prepared_tokens(sd, images, patch, 0)
    for i in range(depth - 1):
        x = _block(sd, i, x, heads)
    p = f"blocks.{depth - 1}."
    y = F.layer_norm(x, x.shape[-1:], sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    return F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
