"""Last-block pieces written out from docs/methods.md §1 and PA from docs/pearl.md §2, for the tiny
test model (2 heads of 32 dims); explicit, independent of pearl/towers/ and pearl/procrustes.py."""
import math

import torch

HEADS, DIM = 2, 32


def qkv(block, x):
    """Per head q, k, v [B, h, T, d] written out from in_proj (test-side transcription)."""
    y = block.ln_1(x)
    w, b = block.attn.in_proj_weight, block.attn.in_proj_bias
    width = x.shape[-1]
    out = []
    for part in range(3):
        t = y @ w[part * width:(part + 1) * width].T + b[part * width:(part + 1) * width]
        out.append(t.view(x.shape[0], x.shape[1], HEADS, DIM).transpose(1, 2))
    return out


def out_proj(block, heads):
    b, h, t, d = heads.shape
    return heads.transpose(1, 2).reshape(b, t, h * d) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias


def full_block(block, x, heads):
    y = x + out_proj(block, heads)
    return y + block.mlp(block.ln_2(y))


def procrustes_attention(q, k, v, alpha, iters=5, solver="polar"):
    """Per-head PA written out from docs/pearl.md §2 with explicit loops."""
    b, h, t, d = q.shape
    out = torch.empty_like(v)
    for bi in range(b):
        for hi in range(h):
            qh, kh, vh = q[bi, hi].double(), k[bi, hi].double(), v[bi, hi].double()
            pi = qh.norm(dim=1)
            pi[0] = 0
            pi = pi / (pi.sum() + 1e-6)
            qc, kc = qh - pi @ qh, kh - pi @ kh
            m = kc.T @ qc
            if solver == "svd":
                u, _, vt = torch.linalg.svd(m)
                r = u @ vt
            else:
                gram = m.T @ m
                a = max(torch.linalg.norm(gram).item(), 1e-6)
                y, w = gram / a + 1e-6 * torch.eye(d, dtype=gram.dtype), torch.eye(d, dtype=gram.dtype)
                for _ in range(iters):
                    tm = 0.5 * (3 * torch.eye(d, dtype=gram.dtype) - w @ y)
                    y, w = y @ tm, tm @ w
                r = m @ w / math.sqrt(a)
            s = d ** -0.5
            logits = (s * qh) @ (kh @ r).T + alpha * s * kc @ kc.T
            out[bi, hi] = (torch.softmax(logits, -1) @ vh).float()
    return out
