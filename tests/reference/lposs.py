"""LPOSS and LPOSS+, transcribed from vladan-stojnic/LPOSS@e489a74 for the tests, with scipy where
upstream uses faiss and cupy: ``models/maskclip/maskclip.py`` (CLIP-DINOiser's MaskCLIP: ``extract_feat``,
``extract_v``), ``models/lposs/lposs.py`` (the DINO qkv hook), ``segmentation/evaluation/lposs_eval.py``
(``get_lposs_laplacian``, ``normalize_connection_graph``, ``perform_lp``, ``get_pixel_connections``,
``get_lposs_plus_laplacian``, ``slide_inference``, ``whole_inference``). A kNN by a full argsort, the
graphs as scipy sparse matrices, ``scipy.sparse.linalg.cg`` per class, Lab by scikit-image.
"""
from itertools import product

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from skimage.color import rgb2lab

from . import dino

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def divisible(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``make_input_divisible``: zero padding right and bottom (black, in [0, 1])."""
    return F.pad(x, (0, (patch - x.shape[-1] % patch) % patch, 0, (patch - x.shape[-2] % patch) % patch))


def clip_features(model, images: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """[B, h, w, D] CLIP-DINOiser MaskCLIP features (before normalisation) of images in [0, 1]."""
    visual = model.visual
    x = (divisible(images, patch) - OPENAI_MEAN) / OPENAI_STD
    b, _, h, w = x.shape
    grid = (h // patch, w // patch)
    tokens = visual.conv1(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([visual.class_embedding.view(1, 1, -1).expand(b, -1, -1), tokens], dim=1)
    pos = visual.positional_embedding
    if tokens.shape[1] != pos.shape[0]:  # resize_pos_embed: bicubic to the size
        side = int((pos.shape[0] - 1) ** 0.5)
        grid_pos = F.interpolate(pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                                 align_corners=False)
        pos = torch.cat([pos[:1], grid_pos.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])
    tokens = visual.ln_pre(tokens + pos[None])
    for block in visual.transformer.resblocks[:-1]:
        tokens = block(tokens)
    block = visual.transformer.resblocks[-1]
    y = F.linear(block.ln_1(tokens), block.attn.in_proj_weight, block.attn.in_proj_bias)
    v = F.linear(y[..., 2 * y.shape[-1] // 3:], block.attn.out_proj.weight, block.attn.out_proj.bias)
    v = v + tokens
    v = v + block.mlp(block.ln_2(v))
    v = visual.ln_post(v)[:, 1:] @ visual.proj
    return v.reshape(b, *grid, -1)


def dino_values(vision_sd: dict, images: torch.Tensor, patch: int, heads: int, depth: int) -> torch.Tensor:
    """[B, h, w, C]: the last block's value projection of images in [0, 1] (``extract_feats('v')``)."""
    x = (divisible(images, patch) - IMAGENET_MEAN) / IMAGENET_STD
    qkv = dino.last_qkv(vision_sd, x, patch, heads, depth)
    b, t, c3 = qkv.shape
    v = qkv.reshape(b, t, 3, heads, c3 // 3 // heads).permute(2, 0, 3, 1, 4)[2]
    v = v.transpose(1, 2)[:, 1:].flatten(-2, -1)
    return v.reshape(b, x.shape[-2] // patch, x.shape[-1] // patch, -1)


def normalise_graph(w: sp.spmatrix) -> sp.spmatrix:
    w = sp.csr_matrix(w)
    w = w - sp.diags(w.diagonal(), 0)
    s = np.asarray(w.sum(axis=1)).ravel()
    s[s == 0] = 1
    d = sp.diags((1.0 / np.sqrt(s)).astype(w.dtype), 0)
    return d @ w @ d


def lposs_laplacian(feats: np.ndarray, locations: np.ndarray, sizes, sigma, power, k, gamma, alpha, patch):
    """L = I − α·Wn (float64) of the kNN graph over all windows' patches."""
    idx_window = np.concatenate([np.full(h * w, i) for i, (h, w) in enumerate(sizes)])
    idx_h = np.concatenate([np.repeat(np.arange(h), w) for h, w in sizes])
    idx_w = np.concatenate([np.tile(np.arange(w), h) for h, w in sizes])
    locs = torch.from_numpy(np.stack([locations[idx_window, 0] + patch // 2 + idx_h * patch,
                                      locations[idx_window, 2] + patch // 2 + idx_w * patch], 1)).float()
    geometry = torch.exp(-sigma * torch.cdist(locs[None], locs[None])[0] ** power).numpy()
    sims = feats @ feats.T
    neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(sims, neighbours, 1).clip(min=0) ** gamma
    values = values * np.take_along_axis(geometry, neighbours, 1)
    rows = np.repeat(np.arange(len(feats)), neighbours.shape[1])
    w = sp.csr_matrix((values.ravel(), (rows, neighbours.ravel())), shape=(len(feats),) * 2)
    return sp.eye(len(feats)) - alpha * normalise_graph(w + w.T)


def label_propagation(laplacian, labels: np.ndarray) -> np.ndarray:
    """``perform_lp``: one conjugate-gradient solve per class, tol 1e-6, at most 10 steps."""
    return np.stack([spla.cg(laplacian, column, rtol=1e-6, maxiter=10)[0] for column in labels.T.astype(np.float64)],
                    axis=1)


def pixel_laplacian(rgb01: np.ndarray, tau: float, neigh: int, alpha: float):
    """``get_lposs_plus_laplacian`` of an H×W×3 image in [0, 1]."""
    lab = (rgb2lab(rgb01) / np.array([100, 128, 128])).reshape(-1, 3)
    height, width = rgb01.shape[:2]
    loc_h, loc_w = np.divmod(np.arange(height * width), width)
    rows, cols = [], []
    for dy, dx in product(range(-neigh, neigh + 1), repeat=2):
        if (dy, dx) == (0, 0):
            continue
        ny, nx = loc_h + dy, loc_w + dx
        inside = (ny >= 0) & (nx >= 0) & (ny < height) & (nx < width)
        rows.append(np.nonzero(inside)[0])
        cols.append(ny[inside] * width + nx[inside])
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    data = np.exp(-np.sqrt(((lab[rows] - lab[cols]) ** 2).sum(-1)) / tau).astype(np.float32)
    w = sp.csr_matrix((data, (rows, cols)), shape=(height * width,) * 2)
    return sp.eye(height * width) - alpha * normalise_graph(w)


def windows(h_img: int, w_img: int, crop: int, stride: int):
    for hi in range(max(h_img - crop + stride - 1, 0) // stride + 1):
        for wi in range(max(w_img - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(hi * stride + crop, h_img), min(wi * stride + crop, w_img)
            yield max(y2 - crop, 0), y2, max(x2 - crop, 0), x2


def segment_logits(model, prototypes: torch.Tensor, image01: torch.Tensor, crop: int, stride: int, vision: dict,
                   graph: dict, plus: dict | None) -> torch.Tensor:
    """[Q, H', W'] LPOSS(+) scores at the input size for one image in [0, 1] [1, 3, H', W']; ``vision``:
    dino_values' keyword arguments; ``graph``: sigma, power, k, gamma, alpha; ``plus``: tau, neigh, alpha."""
    _, _, h_img, w_img = image01.shape
    boxes = list(windows(h_img, w_img, crop, stride)) if crop else [(0, h_img, 0, w_img)]
    crops = torch.cat([image01[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    dino_feats = dino_values(images=crops, **vision)
    clip_feats = F.normalize(clip_features(model, crops), dim=-1)
    if clip_feats.shape[1:3] != dino_feats.shape[1:3]:
        clip_feats = F.interpolate(clip_feats.permute(0, 3, 1, 2), size=dino_feats.shape[1:3], mode="bilinear",
                                   align_corners=False).permute(0, 2, 3, 1)
    sizes = [tuple(dino_feats.shape[1:3])] * len(boxes)
    dino_flat = F.normalize(dino_feats.reshape(-1, dino_feats.shape[-1]), dim=-1)
    clip_flat = F.normalize(clip_feats.reshape(-1, clip_feats.shape[-1]), dim=-1)
    labels = (clip_flat @ F.normalize(prototypes.float(), dim=-1).T).numpy()
    locations = np.array([[y1, y2, x1, x2] for y1, y2, x1, x2 in boxes], dtype=np.float32)
    laplacian = lposs_laplacian(dino_flat.numpy(), locations, sizes, patch=vision["patch"], **graph)
    propagated = torch.from_numpy(label_propagation(laplacian, labels))
    per_window = propagated.reshape(len(boxes), *sizes[0], -1).permute(0, 3, 1, 2)
    if crop:
        preds = torch.zeros((1, per_window.shape[1], h_img, w_img))
        count = torch.zeros((1, 1, h_img, w_img))
        for (y1, y2, x1, x2), logit in zip(boxes, per_window):
            logit = F.interpolate(logit[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            preds += F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
        preds = preds / count
    else:
        preds = per_window
        if plus is not None:
            preds = F.interpolate(preds, size=(h_img, w_img), mode="bilinear", align_corners=False)
    if plus is not None:
        laplacian = pixel_laplacian(image01[0].permute(1, 2, 0).double().numpy(), **plus)
        flat = preds[0].permute(1, 2, 0).reshape(h_img * w_img, -1).numpy()
        preds = torch.from_numpy(label_propagation(laplacian, flat)).T.reshape(1, -1, h_img, w_img)
    return preds[0]
