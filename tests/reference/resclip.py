"""ResCLIP's forward written out from its released code (yvhangyang/ResCLIP@0e085f7 clip/model.py:
``VisionTransformer.forward``, ``create_logit_temp``, ``create_patch_matrix``, ``generate_attention_sfr``,
``check_path``, ``custom_attn``) for one window of the tiny test model (2 heads of 32 dims, width 64),
in its [tokens, heads, ...] layout with loops where upstream vectorises. Test-side: only PAMR comes
from pearl (tests/test_refine.py checks it against its own transcription)."""
import math

import torch
import torch.nn.functional as F

from pearl.methods.naclip import neighbourhood_bias
from pearl.refine.pamr import pamr

from .sfp import split

SCALE = 1 / math.sqrt(32)


def _out_proj(block, heads):
    t = heads.shape[1]
    return heads.transpose(0, 1).reshape(t, 64) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def _strategy_weights(strategy, q, k, grid, sfr, rcs, weights):
    """The last block's attention [heads, T, T] of ``custom_attn(use_custom_attn=True)``."""
    def sfr_mix(logits):
        if sfr is None:
            return logits
        tau, lam = weights["sfr"]
        return tau * ((1 - lam) * logits + lam * sfr)
    if strategy == "naclip":
        a = sfr_mix(torch.bmm(k, k.transpose(1, 2)) * SCALE)
        a = F.softmax(a + neighbourhood_bias(*grid, 5.0), -1)
    elif strategy == "sclip":
        a = F.softmax(sfr_mix(torch.bmm(q, q.transpose(1, 2)) * SCALE), -1) \
            + F.softmax(sfr_mix(torch.bmm(k, k.transpose(1, 2)) * SCALE), -1)
    elif strategy == "clearclip":
        a = F.softmax(sfr_mix(torch.bmm(q, q.transpose(1, 2)) * SCALE), -1)
    tau, lam = weights["rcs"]
    return tau * ((1 - lam) * a + lam * rcs)


def _last(strategy, block, x, grid, sfr, rcs, weights):
    q, k, v = split(block, block.ln_1(x))
    out = _out_proj(block, _strategy_weights(strategy, q, k, grid, sfr, rcs, weights) @ v)
    if strategy == "sclip":  # arch='w_resi'
        y = x + out
        return y + block.mlp(block.ln_2(y))
    return out  # 'wo_resi'


def check_path(labels, w):
    """{(i, j): whether the sampled line from patch i towards j keeps i's label}, pair by pair."""
    n = labels.numel()
    coords = [(i // w, i % w) for i in range(n)]
    steps = {(i, j): max(abs(coords[j][0] - coords[i][0]), abs(coords[j][1] - coords[i][1]))
             for i in range(n) for j in range(n)}
    max_steps = max(steps.values())
    t = torch.linspace(0, 1, steps=max_steps + 1)
    valid = {}
    for (i, j), s in steps.items():
        ok = True
        for step in range(s + 1):
            r = torch.round(coords[i][0] * (1 - t[step]) + coords[j][0] * t[step]).long()
            c = torch.round(coords[i][1] * (1 - t[step]) + coords[j][1] * t[step]).long()
            ok &= bool(labels.view(-1, w)[r, c] == labels.flatten()[i])
        valid[i, j] = ok
    return valid, steps, max_steps


def sfr_prior(labels, grid, same_entity=True, std=5.0):
    """[T, T] ``generate_attention_sfr`` divided by its max and cast to fp16 and back."""
    h, w = grid
    n = h * w
    flat = labels.flatten()
    prior = torch.tensor([[float(flat[i] == flat[j]) for j in range(n)] for i in range(n)])
    if same_entity:
        valid, steps, max_steps = check_path(labels, w)
        for (i, j), ok in valid.items():
            if not ok:
                prior[i, j] = prior[i, j] * math.exp(-steps[i, j] / max_steps)
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    gauss = torch.exp(-((torch.arange(size) - size // 2) ** 2) / (2 * std ** 2))
    gauss = gauss / gauss.sum()
    blurred = torch.zeros(n, n)
    for i in range(n):  # a 'same'-padded 1-D convolution of each row
        for j in range(n):
            blurred[i, j] = sum(gauss[o] * prior[i, j + o - size // 2] for o in range(size)
                                if 0 <= j + o - size // 2 < n)
    blurred = blurred.clamp_min(0)
    full = torch.zeros(n + 1, n + 1)
    full[1:, 1:] = blurred / (blurred.sum(1, keepdim=True) + 1e-8)
    return (full / full.max()).half().float()


def patch_matrix(probs, temp_thd, grid, patch=16):
    """[h', w'] ``create_patch_matrix``: per patch the most frequent pixel label (smallest on ties)."""
    top, labels = probs.max(0)
    labels[top < temp_thd] = 0
    h, w = grid
    out = torch.zeros(h, w, dtype=torch.long)
    for r in range(h):
        for c in range(w):
            values = labels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].flatten().tolist()
            out[r, c] = max(sorted(set(values)), key=values.count)
    return out


def forward(model, hidden, crop, prototypes, strategy, logit_scale=40.0, temp_thd=0.5, weights=None,
            same_entity=True):
    """(patch tokens [N, C] before ln_post, the first pass's patch labels) of one window ``crop``
    [1, 3, H, W] whose trunk is ``hidden`` (block outputs 1..L−1, batch 1)."""
    weights = weights or {"rcs": (2.0, 0.3), "sfr": (2.2, 0.7)}
    blocks = model.visual.transformer.resblocks
    grid = (crop.shape[-2] // 16, crop.shape[-1] // 16)
    rcs_maps = []
    for index in range(5, 9):  # attn_map[5..8]: blocks 6..9 on their inputs
        q, k, _ = split(blocks[index], blocks[index].ln_1(hidden[index - 1][0]))
        rcs_maps.append(F.softmax(torch.bmm(q * SCALE, k.transpose(1, 2)), -1))
    rcs = torch.stack(rcs_maps).mean(0)
    x = hidden[-1][0]
    first = _last(strategy, blocks[-1], x, grid, None, rcs, weights)
    feats = model.visual.ln_post(first) @ model.visual.proj
    feats = feats[1:] / feats[1:].norm(dim=-1, keepdim=True)
    logits = (feats @ prototypes.T).T.reshape(1, -1, *grid)
    logits = F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)
    logits = pamr(crop, logits, 10, (8, 16))
    probs = torch.softmax(logits[0] * logit_scale, 0)
    labels = patch_matrix(probs, temp_thd, grid)
    sfr = sfr_prior(labels, grid, same_entity)
    out = _last(strategy, blocks[-1], x, grid, sfr, rcs, weights)
    return out[1:], labels
