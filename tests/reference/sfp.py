"""SFP's last block written out from docs/methods.md §6.1 with loops over the outlier cells, for the
tiny test model (2 heads of 32 dims, width 64)."""
import math

import torch

from pearl.towers import tower_for


def hidden_states(model, images):
    x, grid = tower_for(model.visual).embed(images)
    hidden = []
    for block in model.visual.transformer.resblocks[:-1]:
        x = block(x)
        hidden.append(x)
    return hidden, grid


def split(block, y):
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    return [(y @ w[i * 64:(i + 1) * 64].T + b[i * 64:(i + 1) * 64]).view(y.shape[0], 2, 32).transpose(0, 1)
            for i in range(3)]


def last_block(model, hidden, grid):
    blocks = model.visual.transformer.resblocks
    h, w = grid
    x = lambda layer: hidden[layer - 1][0]  # batch 1, [T, C]
    q, k, _ = split(blocks[-2], blocks[-2].ln_1(x(10)))
    attn = torch.softmax((q / math.sqrt(32)) @ k.transpose(-1, -2), -1)
    attn[:, 0, 1:] *= 1.5
    mean = attn.mean(0)
    a_cls, a_self = mean[0, 1:], torch.diagonal(mean)[1:]
    candidates = [p for p in range(h * w) if a_cls[p] > a_self[p]]
    outliers = sorted(candidates, key=lambda p: -a_cls[p].item())[:10]
    cells = {(p // w, p % w) for p in outliers}

    def purify_ref(tokens):
        grid_t = tokens.view(h, w, -1).clone()
        out = grid_t.clone()
        for r, c in cells:
            neigh = [grid_t[rr, cc] for rr in range(r - 1, r + 2) for cc in range(c - 1, c + 2)
                     if (rr, cc) != (r, c) and 0 <= rr < h and 0 <= cc < w and (rr, cc) not in cells]
            out[r, c] = torch.stack(neigh).mean(0) if neigh else torch.zeros_like(grid_t[r, c])
        return out.view(h * w, -1)

    def sim(t):
        t = t / t.norm(dim=-1, keepdim=True)
        s = t @ t.T
        s[s < 0.4] = 0
        return s

    agg = lambda s, t: (torch.diag(1 / (s.sum(1) + 1e-6)) @ s) @ t
    s_pre, s_post = sim(purify_ref(x(9)[1:])), sim(x(4)[1:])
    m = 3 * (s_pre - s_pre.mean())
    m[m < 0] = float("-inf")
    block = blocks[-1]
    p1 = agg(s_pre, purify_ref(x(11)[1:]))
    q, k, v = split(block, block.ln_1(p1))
    s = 1 / math.sqrt(32)
    a = (torch.softmax(s * k @ k.transpose(-1, -2), -1) + torch.softmax(s * q @ q.transpose(-1, -2), -1)
         + torch.softmax(m, -1)) / 3
    out_proj = lambda heads: (heads.transpose(0, 1).reshape(h * w, 64) @ block.attn.out_proj.weight.T
                              + block.attn.out_proj.bias)
    p3 = agg(s_post, out_proj(a @ v) + 0.3 * x(11)[0])
    layer_sum = sum(x(layer) for layer in range(4, 11))
    _, _, v2 = split(block, block.ln_1(layer_sum[1:]))
    q3 = agg(s_post, out_proj(torch.softmax(m, -1) @ v2) + 0.3 * layer_sum[0])
    return p3 + q3, cells
