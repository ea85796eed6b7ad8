"""TLP's linear system written out densely from docs/pearl.md §3.2 (loops over grid nodes) and
conjugate gradients by hand, for grids small enough not to pool."""
import numpy as np

from pearl.refine.tlp import TLPConfig


def dense_system(z, guide, affinity, cfg=TLPConfig()):
    """(diag ρ + τ𝓛, ρ⊙Z) for z [1, Q, H, W], guide [1, 3, H, W], G [Q, Q], node by node.

    Every switch of docs/pearl.md §6 that acts on the system is written out: ``quadform``,
    ``softmax_temp``, ``grad_norm``, ``edge_clamp`` (and the constants λ, κ, ε, τ).
    """
    z, guide, g = z[0].numpy(), guide[0].numpy(), affinity.numpy()
    q, height, width = z.shape
    p = np.exp(cfg.softmax_temp * z) / np.exp(cfg.softmax_temp * z).sum(0)
    gmat = np.diag(np.diag(g)) if cfg.quadform == "diag" else g
    n = height * width
    rho = np.zeros(n)
    for i in range(height):
        for j in range(width):
            pi = p[:, i, j]
            u = min(max(pi @ gmat @ pi, 0), 1)
            rho[i * width + j] = max(pi.max(), cfg.eps) ** 2 * (1 + u)
    gray = 0.299 * guide[0] + 0.587 * guide[1] + 0.114 * guide[2]
    gx = np.abs(gray[:, 1:] - gray[:, :-1])
    gy = np.abs(gray[1:] - gray[:-1])
    if cfg.grad_norm == "mean":
        gx, gy = gx / (gx.mean() + 1e-6), gy / (gy.mean() + 1e-6)
    lap = np.zeros((n, n))
    for i in range(height):
        for j in range(width):
            for di, dj, grad in ((0, 1, gx), (1, 0, gy)):
                if i + di >= height or j + dj >= width:
                    continue
                a, b = i * width + j, (i + di) * width + j + dj
                gate = p[:, i + di, j + dj] @ gmat @ p[:, i, j]
                w = np.exp(-cfg.kappa * grad[i, j]) * (1 + cfg.lambda_ * min(max(gate, 0), 1))
                if cfg.edge_clamp:
                    w = min(max(w, 0), 1)
                lap[a, a] += w
                lap[b, b] += w
                lap[a, b] -= w
                lap[b, a] -= w
    matrix = np.diag(rho) + cfg.tau * lap
    rhs = rho[None] * z.reshape(q, n)
    return matrix, rhs


def conjugate_gradient(matrix, rhs, x0, iters):
    x = x0.copy()
    e = rhs - x @ matrix.T
    p, r = e.copy(), (e * e).sum()
    for _ in range(iters):
        ap = p @ matrix.T
        a = r / ((p * ap).sum() + 1e-12)
        x, e = x + a * p, e - a * ap
        r2 = (e * e).sum()
        p, r = e + r2 / (r + 1e-12) * p, r2
    return x
