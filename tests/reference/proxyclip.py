"""ProxyCLIP's last block and vision-model input, transcribed from mc-lan/ProxyCLIP@e7b767f
(``open_clip/transformer.py`` ``custom_attn``, ``proxyclip_segmentor.py`` ``forward_feature``) for the
tests, batch-first, one window at a time as there."""
import torch
import torch.nn.functional as F

from . import dino

CLIP_MEAN_01 = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD_01 = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGENET_MEAN_01 = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD_01 = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def vision_features(vision_sd: dict, crop: torch.Tensor, patch: int, heads: int, depth: int,
                    clip_stats: tuple = (CLIP_MEAN_01, CLIP_STD_01)) -> torch.Tensor:
    """ex_feats [1, C, I, J] of a CLIP-normalised crop [1, 3, h, w]: UnNormalize with ``clip_stats``
    (CLIP's unrounded statistics, as upstream), Normalize with ImageNet's, the DINO forward's normed
    last-block patch tokens."""
    mean, std = clip_stats
    imgs = ((crop * std * 255 + mean * 255) / 255 - IMAGENET_MEAN_01) / IMAGENET_STD_01
    tokens = dino.dense_tokens(vision_sd, imgs, patch, heads, depth)
    rows, cols = crop.shape[-2] // patch, crop.shape[-1] // patch
    return tokens.reshape(1, rows, cols, -1).permute(0, 3, 1, 2)


def custom_attn(block, x: torch.Tensor, ex_feats: torch.Tensor, beta: float, gamma: float,
                token_size: tuple[int, int]) -> torch.Tensor:
    """[1, I·J, C]: out_proj of the proxy attention over CLIP's upsampled values, for x [1, T, C]
    (the last block's input; ``ln_1`` applied here, CLS first)."""
    attn_layer = block.attn
    y = block.ln_1(x)[0]
    num_heads, embed_dim = attn_layer.num_heads, y.shape[-1]
    head_dim = embed_dim // num_heads
    _, _, v = F.linear(y, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    v = v.reshape(-1, num_heads, head_dim).transpose(0, 1)  # [heads, T, d]
    _, _, rows, cols = ex_feats.shape
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    attn_weights = F.softmax(similarity.repeat(num_heads, 1, 1), dim=-1)
    v = v[:, 1:, :].reshape(num_heads, token_size[0], token_size[1], head_dim).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=(rows, cols), mode="bilinear", align_corners=False)
    v = v.permute(0, 2, 3, 1).reshape(num_heads, rows * cols, head_dim)
    out = torch.bmm(attn_weights, v).transpose(0, 1).reshape(1, rows * cols, embed_dim)
    return attn_layer.out_proj(out)


def padsize(height: int, width: int, multiple: int = 56) -> tuple[int, int, int, int]:
    """(left, right, top, bottom): ``compute_padsize(H, W, 56)``."""
    pad_w, pad_h = (multiple - width % multiple) % multiple, (multiple - height % multiple) % multiple
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2
