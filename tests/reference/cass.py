"""CASS's window forward, transcribed from MICV-yonsei/CASS@228ecdd for the tests, one window at a time
as there: ``cass_segmentor.py`` ``forward_feature`` / ``hierarchical_prompt`` / ``hierarchical_clustering``,
``clip/model.py`` ``VisionTransformer.forward`` / ``custom_attn`` / ``_apply_spectral_strategy`` /
``optimal_q`` and ``dino/dino_attention.py`` ``DinoSelfAttention.forward``, on the tiny open_clip model.

Written from those files with the libraries they call (torchvision's transforms, PIL's default resize,
``torch.svd_lowrank`` on the global generator, scipy's ``linear_sum_assignment``, ``linkage`` and
``fcluster``); sklearn's ``cosine_distances`` is scipy's ``pdist(..., 'cosine')`` here. Where upstream
halves the vision model's qkv (its CLIP runs in fp16) the keys keep the model's dtype (fp32 on the CPU).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import pdist
from torchvision import transforms

from . import dino

INV_NORMALIZE = transforms.Normalize(mean=[-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.255],
                                     std=[1 / 0.229, 1 / 0.224, 1 / 0.255])
DINO_TRANSFORM = transforms.Compose([transforms.ToTensor(),
                                     transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])


def hierarchical_clustering(protos: torch.Tensor, h_threshold: float) -> np.ndarray:
    condensed = pdist(protos.double().numpy(), "cosine")
    return fcluster(linkage(condensed, method="ward"), t=h_threshold, criterion="distance") - 1


def dino_keys(vision_sd: dict, inv_image: Image.Image, patch: int, heads: int, depth: int) -> torch.Tensor:
    """[heads, d, N]: ``DinoSelfAttention.forward``'s qkv, then ``_get_dino_key``."""
    img = DINO_TRANSFORM(inv_image)
    w, h = img.shape[1] - img.shape[1] % patch, img.shape[2] - img.shape[2] % patch
    img = img[:, :w, :h].unsqueeze(0)
    qkv = dino.last_qkv(vision_sd, img, patch, heads, depth)
    _, tokens, channels = qkv.shape
    qkv = qkv.reshape(1, tokens, 3, heads, channels // 3 // heads).permute(2, 0, 3, 1, 4)
    return qkv[1, :, :, 1:, :].squeeze(0).permute(0, 2, 1), (w // patch, h // patch)


def gaussian_window(dim1, dim2, std):
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in [dim1, dim2]:
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start=start * constant, end=(start + (dim - 1)) * constant, steps=dim,
                                 dtype=torch.float))
    return torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))


def attention_addition(dim1, dim2, std):
    window = gaussian_window(dim1 * 2 - 1, dim2 * 2 - 1, std)
    m = torch.einsum("ij,kl->ijkl", torch.eye(dim1), torch.eye(dim2)).permute((0, 3, 1, 2)).contiguous()
    out = F.conv2d(m.view(-1, dim1, dim2).unsqueeze(1), window.unsqueeze(0).unsqueeze(1), padding="same").squeeze(1)
    return out.view(dim1 * dim2, dim1 * dim2).unsqueeze(0)


def spectrum(adj_matrices, k_eigen):
    values = []
    for adj in adj_matrices:
        vals, _ = torch.sort(torch.linalg.eigvalsh(adj), descending=True)
        values.append(vals[:k_eigen])
    return torch.stack(values)


def optimal_q(adj, energy_threshold=0.95, initial_q=10, step_size=5):
    max_q, current_q = min(adj.shape), initial_q
    while current_q <= max_q:
        u, s, vh = torch.svd_lowrank(adj.type(torch.float64), q=current_q)
        cumulative = torch.cumsum(s, dim=0) / torch.sum(s)
        if (cumulative >= energy_threshold).any():
            return torch.searchsorted(cumulative, energy_threshold).item() + 1, u, s, vh
        current_q += step_size
    return max_q, u, s, vh


def range_of(source, target):
    normalized = (source - source.min()) / (source.max() - source.min())
    return normalized * (target.max() - target.min()) + target.min()


def spectral_strategy(k, dino_key_final, scale, num_heads, config):
    attn_weights = torch.bmm(k, k.transpose(1, 2)) * scale
    dino_attn_weights = torch.bmm(dino_key_final, dino_key_final.transpose(1, 2)) * scale
    dino_eigen = F.normalize(spectrum(dino_attn_weights.type(torch.float64), 20), p=2, dim=1)
    clip_eigen = F.normalize(spectrum(attn_weights.type(torch.float64), 20), p=2, dim=1)
    cost = torch.zeros(num_heads, num_heads)
    for i in range(num_heads):
        for j in range(num_heads):
            u = torch.sort(F.normalize(dino_eigen[i].unsqueeze(0), p=1, dim=-1))[0]
            v = torch.sort(F.normalize(clip_eigen[j].unsqueeze(0), p=1, dim=-1))[0]
            cost[i, j] = 1 - torch.sum(torch.abs(u - v))
    row_ind, col_ind = linear_sum_assignment(cost.numpy())
    combined = torch.zeros_like(attn_weights)
    for idx in range(num_heads):
        i, j = row_ind[idx], col_ind[idx]
        w_d = 1 - cost[i, j]
        _, u_topk, s_topk, v_topk = optimal_q(dino_attn_weights[j])
        if config["rescale"]:
            low, high = s_topk.min(), s_topk.max()
            s_topk = (s_topk.clone() - low) / (high - low) * (1.5 * high - 0.5 * low) + 0.5 * low
        approx = u_topk @ torch.diag(s_topk) @ v_topk.T
        approx.fill_diagonal_(0)
        combined[idx] = (w_d * 10.0 * range_of(approx, attn_weights[i]) + attn_weights[i]) / (w_d * 10.0 + 1)
    return combined


def embedded(model, img):
    """Tokens [1, T, C] entering block 1 (``interpolate_pos_encoding``'s +0.1 scale factor)."""
    visual = model.visual
    _, _, h, w = img.shape
    x = visual.conv1(img).reshape(1, visual.conv1.out_channels, -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1)
    pos = visual.positional_embedding
    if x.shape[1] != pos.shape[0]:
        side, dim = int(math.sqrt(pos.shape[0] - 1)), pos.shape[-1]
        patch = F.interpolate(pos[1:].reshape(1, side, side, dim).permute(0, 3, 1, 2), mode="bicubic",
                              scale_factor=((h // 16 + 0.1) / side, (w // 16 + 0.1) / side), align_corners=False,
                              recompute_scale_factor=False)
        pos = torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(-1, dim)])
    return visual.ln_pre(x + pos[None])


def encode_image(model, img, vision, return_cls):
    """``VisionTransformer.forward``: (patch features [1, N, D], CLS embedding [1, D]) or the CLS alone."""
    visual = model.visual
    _, _, h, w = img.shape
    n_patches = (h // 16, w // 16)
    inv = INV_NORMALIZE(img.squeeze().cpu()).permute(1, 2, 0).numpy() * 255
    small = min(h, w)
    inv_image = Image.fromarray(inv.astype("uint8")).resize((small, small))
    keys, dino_grid = dino_keys(vision["vision_sd"], inv_image, vision["patch"], vision["heads"], vision["depth"])
    x = embedded(model, img)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    blk = visual.transformer.resblocks[-1]
    x_last = visual.ln_post(blk(x)[:, 0, :]) @ visual.proj
    if return_cls:
        return x_last
    attn_layer = blk.attn
    y = blk.ln_1(x)[0]
    num_heads, embed_dim = attn_layer.num_heads, y.shape[-1]
    head_dim = embed_dim // num_heads
    q, k, v = F.linear(y, attn_layer.in_proj_weight, attn_layer.in_proj_bias).chunk(3, dim=-1)
    k = k.contiguous().view(-1, num_heads, head_dim).transpose(0, 1)[:, 1:, :]
    v = v.contiguous().view(-1, num_heads, head_dim).transpose(0, 1)[:, 1:, :]
    dino_key = F.interpolate(keys.reshape(num_heads, head_dim, *dino_grid), size=n_patches, mode="bilinear",
                             align_corners=False)
    dino_key = dino_key.reshape(num_heads, head_dim, -1).permute(0, 2, 1)
    dino_key = range_of(dino_key, k)
    torch.manual_seed(0)  # the per-window seed of pearl's randomised SVD (upstream: the global stream)
    attn = spectral_strategy(k, dino_key, head_dim ** -0.5, num_heads, vision)
    attn = F.softmax(attn + attention_addition(*n_patches, 5.0), dim=-1)
    out = attn_layer.out_proj(torch.bmm(attn, v).transpose(0, 1).contiguous().view(-1, embed_dim))
    return visual.ln_post(out[None]) @ visual.proj, x_last


def forward_feature(model, img, whole_img, protos, clusters, vision):
    """[1, Q, h, w] logits of one window [1, 3, h, w] at its size; ``whole_img`` None: its own CLS."""
    image_features, x_last = encode_image(model, img, vision, return_cls=False)
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    x_last = x_last / x_last.norm(dim=-1, keepdim=True)
    if whole_img is None:
        global_sim = x_last @ protos.T
    else:
        global_vector = encode_image(model, whole_img, vision, return_cls=True)
        global_sim = (global_vector / global_vector.norm(dim=-1, keepdim=True)) @ protos.T
    adjusted = hierarchical_prompt(image_features, global_sim, protos, clusters, vision["mean_vector_weight"])
    logits = image_features @ adjusted.T
    weight = vision["global_weight"]
    logits = logits * (1 - weight) + global_sim.reshape(1, 1, -1).repeat(1, logits.shape[1], 1) * weight
    h, w = img.shape[-2] // 16, img.shape[-1] // 16
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], h, w)
    return F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=False)


def hierarchical_prompt(image_features, similarities, protos, clusters, alpha):
    similarities = similarities.squeeze(0).numpy()
    image_features = image_features.squeeze(0)
    adjusted = protos.clone()
    for cluster_id in range(len(set(clusters))):
        indices = np.where(clusters == cluster_id)[0]
        class_i = int(indices[np.argmax(similarities[indices])])
        text = F.normalize(protos[class_i].unsqueeze(0), dim=1)
        scores = torch.matmul(F.normalize(image_features, dim=1), text.t()).squeeze(1)
        _, top = torch.topk(scores, min(2, image_features.size(0)))
        mean_vector = F.normalize(image_features[top].mean(dim=0), dim=0)
        adjusted[class_i] = F.normalize((1 - alpha) * text.squeeze(0) + alpha * mean_vector, dim=0)
    return adjusted
