"""SC-CLIP's last block written out from its released ``VisionTransformer.forward`` (SuleBai/SC-CLIP@0417ba9
clip/model.py) one image at a time, with loops over the anomalous cells, for the tiny test model
(2 heads of 32 dims, width 64). Test-side: it imports nothing from pearl/methods."""
import math

import torch

from .sfp import split


def lof_pytorch(x, n_neighbors=30, contamination=0.05):
    """Upstream's LOF on one image's patch tokens [N, C] → sorted outlier indices (k shrinks to N − 1)."""
    n_neighbors = min(n_neighbors, x.shape[0] - 1)
    distances = torch.norm(x[:, None] - x[None, :], dim=2, p=2) ** 2
    knn_distances, knn_indices = torch.topk(distances, k=n_neighbors + 1, largest=False)
    knn_distances, knn_indices = knn_distances[:, 1:], knn_indices[:, 1:]
    k_distances = knn_distances[:, -1].unsqueeze(1).expand_as(knn_distances)
    reach_distances = torch.max(knn_distances, k_distances)
    lrd = n_neighbors / torch.nan_to_num(reach_distances.mean(dim=1), nan=1e-6)
    lof = (lrd[knn_indices] / lrd.unsqueeze(1)).mean(dim=1)
    threshold = torch.quantile(lof.to(torch.float32), 1 - contamination)
    return torch.where(lof > threshold)[0].tolist()


def mean_interpolation(tokens, cells, h, w):
    """Each anomalous cell ← the mean of its in-bounds non-anomalous 8-neighbours; unchanged if none."""
    grid = tokens.view(h, w, -1)
    out = grid.clone()
    for r, c in cells:
        neigh = [grid[rr, cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                 if (rr, cc) != (r, c) and 0 <= rr < h and 0 <= cc < w and (rr, cc) not in cells]
        if neigh:
            out[r, c] = sum(neigh) / len(neigh)
    return out.view(h * w, -1)


def last_block(model, hidden, grid, res_cls=0.3, layers=(9, 4, 4, 10)):
    """(patch tokens [N, C] before ln_post, the anomalous cells) of image 0 of ``hidden``."""
    block = model.visual.transformer.resblocks[-1]
    h, w = grid
    x = lambda layer: hidden[layer - 1][0]  # [T, C]
    pre, post, first, last = layers
    cells = {(i // w, i % w) for i in lof_pytorch(x(len(hidden))[1:])}

    def unit_sim(t):
        t = t / t.norm(dim=-1, keepdim=True)
        return t @ t.T

    def floor(s):
        s = s.clone()
        s[s < 0.4] = 0.0
        return s

    agg = lambda s, t: (s / (s.sum(-1, keepdim=True) + 1e-6)) @ t
    mid = unit_sim(mean_interpolation(x(pre)[1:], cells, h, w))
    centred = (mid - mid.mean()) * 3.0
    centred[centred < 0] = float("-inf")
    smap = torch.softmax(centred, -1)

    def custom_attn(t):
        _, k, v = split(block, block.ln_1(t))
        a = smap + torch.softmax(torch.bmm(k, k.transpose(1, 2)) * (1 / math.sqrt(32)), -1)
        heads = (a / 2) @ v
        return heads.transpose(0, 1).reshape(h * w, 64) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias

    main = agg(floor(mid), mean_interpolation(x(len(hidden))[1:], cells, h, w))
    main = custom_attn(main) + res_cls * x(len(hidden))[0]
    after = floor(unit_sim(x(post)[1:]))
    main = agg(after, main)
    summed = torch.zeros_like(x(1))
    for layer in range(first, last + 1):
        summed = summed + x(layer)
    multi = agg(after, custom_attn(summed[1:]) + res_cls * summed[0])
    return main + multi, cells
