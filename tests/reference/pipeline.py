"""The released segmentors' flow, transcribed independently of pearl/segmentor.py.

NACLIP/SCLIP/ClearCLIP/PEARL ``predict``: BGR image (as cv2 loads it) → MMCV rescale → flip to RGB
and normalise → windows one at a time (batch 1) → per-window logits upsampled to the crop (ClearCLIP:
padded crops, padding cut) → [per-window TLP] → padded into a float32 canvas → average → original size
→ PAMR / TLP → softmax(logit_scale·L), one-hot synonym max, area filter, prob_thd. The last blocks
are the transcriptions of tests/reference/blocks.py, sfp.py, scclip.py and gem.py (test-side, not pearl/towers/).
"""
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pearl.methods.naclip import neighbourhood_bias
from pearl.refine.pamr import pamr
from pearl.refine.tlp import TLPConfig, tlp

from . import blocks as ref
from . import cass as cass_ref
from . import gem as gem_ref
from . import glaclip as glaclip_ref
from . import proxyclip as proxyclip_ref
from . import resclip as resclip_ref
from . import scclip as scclip_ref
from . import sfp as sfp_ref

MEAN, STD = np.array([122.771, 116.746, 104.094]), np.array([68.501, 66.632, 70.323])


def last_block(method, block, x, pa, arch):
    q, k, v = ref.qkv(block, x)
    s = 32 ** -0.5
    if method in ("vanilla", "pearl"):
        heads = ref.procrustes_attention(q, k, v, 0.08) if pa else torch.softmax((q * s) @ k.transpose(-1, -2), -1) @ v
        return ref.full_block(block, x, heads) if arch == "vanilla" else ref.out_proj(block, heads)
    if method == "sclip":
        attn = torch.softmax((q @ q.transpose(-1, -2)) * s, -1) + torch.softmax((k @ k.transpose(-1, -2)) * s, -1)
        return ref.full_block(block, x, attn @ v)
    if method == "clearclip":
        return ref.out_proj(block, torch.softmax((q @ q.transpose(-1, -2)) * s, -1) @ v)
    if method == "maskclip":  # ClearCLIP's model_type='MaskCLIP': softmax of a 0-diagonal, −∞ elsewhere mask
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).fill_diagonal_(0)
        return ref.out_proj(block, torch.softmax(mask, -1) @ v)
    raise AssertionError(f"no reference last block for {method}")


def forward_feature(model, img, method, pa, arch, protos, resclip=None, vision=None):
    """One crop [1, 3, h, w] → cosine logits [1, Q, h', w'], upstream style; ``resclip`` (the keyword
    arguments of tests/reference/resclip.py ``forward``) runs ResCLIP on the host ``method``; ``vision``
    (the keyword arguments of tests/reference/proxyclip.py ``vision_features``, and beta, gamma) is
    ProxyCLIP's vision model, whose grid the logits come out at."""
    visual = model.visual
    _, _, h, w = img.shape
    x = visual.conv1(img).reshape(1, 64, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1)
    gh, gw = h // 16, w // 16
    if method == "gem" and (gh, gw) != (4, 4):  # GEM: resample_abs_pos_embed, by size with antialiasing
        pos = visual.positional_embedding
        patch = F.interpolate(pos[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2), size=(gh, gw), mode="bicubic",
                              antialias=True)
        x = x + torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(-1, 64)])[None]
    elif method != "gem" and x.shape[1] != visual.positional_embedding.shape[0]:
        pos = visual.positional_embedding
        patch = F.interpolate(pos[1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2),
                              scale_factor=((gh + 0.1) / 4, (gw + 0.1) / 4), mode="bicubic")
        x = x + torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(-1, 64)])[None]
    else:
        x = x + visual.positional_embedding[None]
    x = visual.ln_pre(x)
    hidden = []
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
        hidden.append(x)
    block = visual.transformer.resblocks[-1]
    if resclip is not None:
        patches, _ = resclip_ref.forward(model, hidden, img, protos, method, **resclip)
        out = torch.cat([x[:, :1], patches[None]], dim=1)
    elif method == "sfp":
        patches, _ = sfp_ref.last_block(model, hidden, (gh, gw))
        out = torch.cat([x[:, :1], patches[None]], dim=1)  # a CLS row to drop below, as the others
    elif method == "scclip":
        patches, _ = scclip_ref.last_block(model, hidden, (gh, gw))
        out = torch.cat([x[:, :1], patches[None]], dim=1)
    elif method == "gem":
        out = gem_ref.gem_path(model, hidden)
    elif method == "proxyclip":
        vision = dict(vision)
        beta, gamma = vision.pop("beta"), vision.pop("gamma")
        ex_feats = proxyclip_ref.vision_features(crop=img, **vision)
        out = proxyclip_ref.custom_attn(block, x, ex_feats, beta, gamma, (gh, gw))
        gh, gw = ex_feats.shape[-2:]
        out = torch.cat([x[:, :1], out], dim=1)  # a CLS row to drop below, as the others
    elif method == "naclip":
        q, k, v = ref.qkv(block, x)
        attn = torch.softmax((k @ k.transpose(-1, -2)) * 32 ** -0.5 + neighbourhood_bias(gh, gw, 5.0), -1)
        out = ref.out_proj(block, attn @ v)
    else:
        out = last_block(method, block, x, pa, arch)
    feats = visual.ln_post(out) @ visual.proj
    feats = feats[:, 1:]
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = (feats @ protos.T).permute(0, 2, 1).reshape(1, -1, gh, gw)
    return logits


def clearclip_padsize(height: int, width: int, patch: int = 16) -> tuple[int, int, int, int]:
    """(left, right, top, bottom): ClearCLIP ``compute_padsize``, the odd pixel right and bottom."""
    pad_w, pad_h = (patch - width % patch) % patch, (patch - height % patch) % patch
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def rescaled(rgb: np.ndarray, short: int) -> np.ndarray:
    """The RGB photograph as MMCV's keep-ratio rescale to (2048, short) gives it (uint8, BGR in, as
    cv2.imread gives it, flipped back)."""
    bgr = rgb[:, :, ::-1]
    h0, w0 = bgr.shape[:2]
    scale = min(2048 / max(h0, w0), short / min(h0, w0))
    resized = cv2.resize(np.ascontiguousarray(bgr), (int(w0 * scale + 0.5), int(h0 * scale + 0.5)),
                         interpolation=cv2.INTER_LINEAR)
    return resized[:, :, ::-1]


def segment(model, protos, query_idx, rgb, method, pa, tlp_on, params, affinity, vision=None):
    """(labels [H, W], class probabilities [C, H, W]) of one RGB photograph, the released way."""
    h0, w0 = rgb.shape[:2]
    inputs = torch.from_numpy(((rescaled(rgb, params["resize_short"]) - MEAN) / STD).astype(np.float32))
    inputs = inputs.permute(2, 0, 1)[None]
    arch = "vanilla" if method == "vanilla" else "reduced"
    per_window = params.get("tlp_site") == "per_window"
    tlp_config = TLPConfig(grid=params.get("tlp_grid", 80), pool=params.get("tlp_pool", "int_stride"),
                           quadform=params.get("tlp_quadform", "diag"))
    crop, stride = params["slide_crop"], params["slide_stride"]
    resclip = dict(logit_scale=params["logit_scale"], temp_thd=params["resclip_temp_thd"]) \
        if params.get("resclip") else None
    if method == "cass":  # its own forward_feature: logits at the window's size, reading the whole image's CLS
        clusters = cass_ref.hierarchical_clustering(protos, vision["h_threshold"])
        whole = inputs if vision["global_embedding"] == "image" else None
        def window_forward(img, whole):
            return cass_ref.forward_feature(model, img, whole, protos, clusters, vision)
    else:
        def window_forward(img, whole):
            return forward_feature(model, img, method, pa, arch, protos, resclip, vision)
    if method == "glaclip":  # all windows in one forward (forward_kv_expansion)
        fused = glaclip_ref.forward_kv_expansion(model, inputs, protos, vision, vision, stride, crop)
        logits = F.interpolate(fused, size=(h0, w0), mode="bilinear", align_corners=False)
    elif crop > 0:
        _, _, h_img, w_img = inputs.shape
        preds = inputs.new_zeros((1, len(query_idx), h_img, w_img))
        count = inputs.new_zeros((1, 1, h_img, w_img))
        for hi in range(max(h_img - crop + stride - 1, 0) // stride + 1):
            for wi in range(max(w_img - crop + stride - 1, 0) // stride + 1):
                y2, x2 = min(hi * stride + crop, h_img), min(wi * stride + crop, w_img)
                y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
                crop_img = inputs[:, :, y1:y2, x1:x2]
                pad = (clearclip_padsize(*crop_img.shape[-2:]) if method in ("clearclip", "maskclip", "gem")
                       else proxyclip_ref.padsize(*crop_img.shape[-2:]) if method == "proxyclip" else (0, 0, 0, 0))
                padded = F.pad(crop_img, pad)
                logit = window_forward(padded, whole if method == "cass" else None)
                logit = F.interpolate(logit, size=padded.shape[-2:], mode="bilinear", align_corners=False)
                logit = logit[:, :, pad[2]:pad[2] + crop_img.shape[2], pad[0]:pad[0] + crop_img.shape[3]]
                if tlp_on and per_window:  # the paper's site: each window's logits with its crop of the input
                    logit = tlp(logit, crop_img, affinity, tlp_config)
                preds += F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
                count[:, :, y1:y2, x1:x2] += 1
        logits = F.interpolate(preds / count, size=(h0, w0), mode="bilinear", align_corners=False)
    else:
        logit = window_forward(inputs, None)
        if method in ("naclip", "pearl", "vanilla", "cass") or (tlp_on and per_window):
            logit = F.interpolate(logit, size=inputs.shape[-2:], mode="bilinear", align_corners=False)
            if tlp_on and per_window:
                logit = tlp(logit, inputs, affinity, tlp_config)
        logits = F.interpolate(logit, size=(h0, w0), mode="bilinear", align_corners=False)
    guide = F.interpolate(inputs, size=(h0, w0), mode="bilinear", align_corners=False)
    if params.get("pamr"):
        logits = pamr(guide, logits)
    if tlp_on and not per_window:
        logits = tlp(logits, guide, affinity, tlp_config)
    return decide(logits, query_idx, params)


def decide(logits: torch.Tensor, query_idx, params: dict):
    """(labels [H, W], class probabilities [C, H, W]) from query logits [1, Q, H, W]."""
    probs = torch.softmax(logits[0] * params["logit_scale"], 0)
    num_cls = max(query_idx) + 1
    one_hot = F.one_hot(torch.tensor(query_idx)).T.view(num_cls, len(query_idx), 1, 1)
    probs = (probs[None] * one_hot).max(1)[0]
    filtered = probs.clone()
    if params.get("area_thd"):
        area = F.one_hot(probs.argmax(0), num_cls).to(probs.dtype)[:, :, 1:].sum((0, 1))
        filtered[1:] *= (area > params["area_thd"] * area.sum()).to(probs.dtype)[:, None, None]
    labels = filtered.argmax(0)
    labels[filtered.max(0)[0] < params["prob_thd"]] = 0
    return labels, probs
