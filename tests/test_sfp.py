"""SFP against a literal transcription of docs/methods.md §6.1 (loops over outlier cells)."""
import math

import pytest
import torch

from pearl.backbone import embed
from pearl.methods.sfp import purify

from .conftest import build_method


def _hidden(model, images):
    x, grid = embed(model.visual, images)
    hidden = []
    for block in model.visual.transformer.resblocks[:-1]:
        x = block(x)
        hidden.append(x)
    return hidden, grid


def _split(block, y):
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    return [(y @ w[i * 64:(i + 1) * 64].T + b[i * 64:(i + 1) * 64]).view(y.shape[0], 2, 32).transpose(0, 1)
            for i in range(3)]


def _reference_sfp(model, hidden, grid):
    blocks = model.visual.transformer.resblocks
    h, w = grid
    x = lambda layer: hidden[layer - 1][0]  # batch 1, [T, C]
    q, k, _ = _split(blocks[-2], blocks[-2].ln_1(x(10)))
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
    q, k, v = _split(block, block.ln_1(p1))
    s = 1 / math.sqrt(32)
    a = (torch.softmax(s * k @ k.transpose(-1, -2), -1) + torch.softmax(s * q @ q.transpose(-1, -2), -1)
         + torch.softmax(m, -1)) / 3
    out_proj = lambda heads: (heads.transpose(0, 1).reshape(h * w, 64) @ block.attn.out_proj.weight.T
                              + block.attn.out_proj.bias)
    p3 = agg(s_post, out_proj(a @ v) + 0.3 * x(11)[0])
    layer_sum = sum(x(layer) for layer in range(4, 11))
    _, _, v2 = _split(block, block.ln_1(layer_sum[1:]))
    q3 = agg(s_post, out_proj(torch.softmax(m, -1) @ v2) + 0.3 * layer_sum[0])
    return p3 + q3, cells


def test_sfp_matches_reference(tiny_model):
    torch.manual_seed(7)
    images = torch.randn(1, 3, 160, 176)
    hidden, grid = _hidden(tiny_model, images)
    ours = build_method("sfp").last_block(tiny_model.visual.transformer.resblocks, hidden[-1], hidden, grid, {})
    expected, cells = _reference_sfp(tiny_model, hidden, grid)
    assert cells  # the random model does produce outliers
    assert torch.allclose(ours[0], expected, atol=1e-4)


def test_purify_isolated_outlier_nan_guard():
    tokens = torch.arange(2 * 9 * 2, dtype=torch.float32).view(2, 9, 2)
    outliers = torch.zeros(2, 9, dtype=torch.bool)
    outliers[0, 4] = True           # centre of a 3×3 grid: mean of its 8 clean neighbours
    outliers[1] = True              # every cell an outlier: no clean neighbour → 0 (or kept with the guard)
    out = purify(tokens, outliers, (3, 3))
    assert torch.allclose(out[0, 4], tokens[0, [0, 1, 2, 3, 5, 6, 7, 8]].mean(0))
    assert torch.equal(out[0, :4], tokens[0, :4])
    assert torch.all(out[1] == 0)
    assert torch.equal(purify(tokens, outliers, (3, 3), guard=True)[1], tokens[1])


def test_sfp_needs_twelve_blocks_or_an_explicit_layer_map(tiny_model):
    import copy
    model = copy.deepcopy(tiny_model)
    model.visual.transformer.resblocks = model.visual.transformer.resblocks[:6]
    hidden, grid = _hidden(model, torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="12-block"):
        build_method("sfp").last_block(model.visual.transformer.resblocks, hidden[-1], hidden, grid, {})
    mapped = build_method("sfp", sfp_layers=(4, 2, 2, 4))
    out = mapped.last_block(model.visual.transformer.resblocks, hidden[-1], hidden, grid, {})
    assert out.shape == (1, 16, 64)


def test_l2_and_lof_detectors_find_planted_outliers():
    from pearl.methods.sfp import _l2_outliers, _lof_outliers
    torch.manual_seed(0)
    tokens = torch.randn(1, 64, 8) * 0.1
    tokens[0, 17] += 5.0   # far from the cluster and large
    tokens[0, 40] *= 30.0  # large norm
    assert _l2_outliers(tokens, 2)[0].nonzero().flatten().tolist() == [17, 40]
    lof = _lof_outliers(tokens)[0]
    assert lof[17] and lof[40] and lof.sum() <= 4  # contamination 5 % of 64 → about 3 points
