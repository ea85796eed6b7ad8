"""GLA-CLIP's sliding inference, transcribed from 2btlFe/GLA-CLIP@ba74915 for the tests:
``gla_clip_segmentor.py`` ``forward_kv_expansion`` / ``forward_feature``, ``open_clip/transformer.py``
``VisionTransformer.forward`` / ``Custom_Attn_Model_Type.forward`` (CLIP_type 'ProxyCLIP', KV extension)
and ``myutils.py`` ``KV_Extension.forward`` with ``dynamic_beta`` / ``dynamic_gamma``, all windows of the
image in one batch and the full [1, N, N] similarity matrices as there, on the tiny open_clip model."""
import numpy as np
import torch
import torch.nn.functional as F

from . import cass as cass_ref
from . import proxyclip as proxyclip_ref


def kv_extension(ex_feats_grid, v_ext, num_heads, token_size, config):
    """``KV_Extension.forward`` (smoothing off, token_norm on): [S, B, C] before out_proj."""
    h_grids, w_grids, C, H, W = ex_feats_grid.shape
    B, S = h_grids * w_grids, H * W
    key = F.normalize(ex_feats_grid.permute(0, 1, 3, 4, 2).reshape(B, S, C).reshape(1, B * S, C), dim=-1)
    v_ext = v_ext.reshape(B * num_heads, token_size[0], token_size[1], -1).permute(0, 3, 1, 2).contiguous()
    v_ext = F.interpolate(v_ext, size=(H, W), mode="bilinear", align_corners=False)
    Dh = v_ext.shape[1]
    v_ext = v_ext.view(B, num_heads, Dh, H, W).flatten(3).permute(1, 0, 3, 2).reshape(num_heads, B * S, Dh)
    mask_one = None
    if config["proxy_sim"] or config["dynamic_gamma"]:
        proxy = key.clone()
        attn_weights = torch.bmm(F.normalize(proxy, dim=-1), key.transpose(1, 2))
        for _ in range(config["mini_iters"]):
            mask_one = (attn_weights > config["initial_crit_pos"]).to(key.dtype)
            gone = torch.where(mask_one.sum(dim=-1)[0] == 0)[0]
            if len(gone) != 0:
                mask_one[0, gone, gone] = 1
            proxy = torch.bmm(mask_one, key) / (mask_one.sum(dim=-1, keepdim=True) + 1e-6)
            attn_weights = torch.bmm(F.normalize(proxy, dim=-1), key.transpose(1, 2))
        if not config["proxy_sim"]:
            attn_weights = torch.bmm(key, key.transpose(1, 2))
    else:
        attn_weights = torch.bmm(key, key.transpose(1, 2))
    attn_weights = attn_weights.reshape(B, S, B * S)
    sim_mean = attn_weights.mean(dim=-1, keepdim=True)
    gamma = 1 + config["gamma_alpha"] / mask_one.sum(dim=-1).reshape(B, S, 1) if config["dynamic_gamma"] \
        else config["gamma"]
    beta = 1 + config["beta_alpha"] * np.log1p(B) if config["dynamic_beta"] else config["beta"]
    sim_mean[sim_mean < 0] = 0
    attn_weights = (attn_weights - sim_mean * beta) * gamma
    cutting = torch.minimum(attn_weights.max(dim=-1, keepdim=True).values, torch.as_tensor(0.0))
    attn_weights.masked_fill_(attn_weights < cutting, float("-inf"))
    attn_weights = F.softmax(attn_weights / 1.0, dim=-1)
    attn_output = torch.einsum("bsn,hnd->hsbd", attn_weights, v_ext)
    return attn_output.permute(1, 2, 0, 3).reshape(S, B, -1)


def forward_kv_expansion(model, img, protos, vision, config, stride, crop):
    """[1, Q, H, W]: the averaged window logits of the CLIP-normalised input [1, 3, H, W]."""
    visual = model.visual
    _, _, h_img, w_img = img.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    crops, boxes, pads = [], [], []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * stride + crop, h_img), min(w_idx * stride + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            pad = proxyclip_ref.padsize(*crop_img.shape[-2:])
            crops.append(F.pad(crop_img, pad))
            boxes.append((x1, x2, y1, y2))
            pads.append(pad)
    crops = torch.cat(crops)
    ex_feats = torch.cat([proxyclip_ref.vision_features(vision["vision_sd"], one[None], vision["patch"],
                                                        vision["heads"], vision["depth"], vision["clip_stats"])
                          for one in crops])
    tokens = []
    for one in crops:
        x = cass_ref.embedded(model, one[None])
        for blk in visual.transformer.resblocks[:-1]:
            x = blk(x)
        tokens.append(x[0])
    x = torch.stack(tokens).permute(1, 0, 2)[1:]  # LND, the CLS token dropped
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    num_heads, embed_dim = attn.num_heads, x.shape[-1]
    bsz = x.shape[1]
    _, _, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    v = v.contiguous().view(-1, bsz * num_heads, embed_dim // num_heads).transpose(0, 1)
    B, C, H, W = ex_feats.shape
    grid = ex_feats.reshape(h_grids, w_grids, C, H, W)
    token_size = (crops.shape[-2] // 16, crops.shape[-1] // 16)
    out = attn.out_proj(kv_extension(grid, v, num_heads, token_size, config)).permute(1, 0, 2)
    feats = visual.ln_post(out) @ visual.proj
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = (feats @ protos.T).permute(0, 2, 1).reshape(B, -1, H, W)
    preds = img.new_zeros((1, protos.shape[0], h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    logits = F.interpolate(logits, size=(crop, crop), mode="bilinear", align_corners=False)  # the configured crop
    for index, ((x1, x2, y1, y2), pad) in enumerate(zip(boxes, pads)):
        window = logits[index:index + 1, :, pad[2]:pad[2] + (y2 - y1), pad[0]:pad[0] + (x2 - x1)]
        preds += F.pad(window, (x1, w_img - x2, y1, h_img - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return preds / count
