"""PEARL's Procrustes alignment (PA) of keys to queries inside the last block.

docs/pearl.md §2, after PGSmall/PEARL@c26062b ``pearl/attn.py`` (``pa_attn``,
``_polar_unitary_newton_schulz``). All arithmetic is fp32; tensors are [B, heads, T, d] with the
CLS token at T index 0.
"""
from __future__ import annotations

import warnings

import torch

SOLVERS = ("polar", "svd")


def polar_newton_schulz(m: torch.Tensor, iters: int = 5) -> torch.Tensor:
    """R ≈ M (MᵀM)^(−1/2) by the released coupled Newton–Schulz iteration; m [..., d, d].

    Γ = MᵀM, a = max(‖Γ‖_F, 1e−6), Γ̃ = Γ/a + 1e−6·I; Y ← Γ̃, W ← I; repeat: T = ½(3I − W·Y),
    Y ← Y·T, W ← T·W; R = M·W/√a. Not converged after 5 steps: weak directions are shrunk.
    """
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m)
    gram = m.transpose(-1, -2) @ m
    norm = torch.linalg.matrix_norm(gram).clamp_min(1e-6)[..., None, None]
    y = gram / norm + 1e-6 * eye
    w = eye
    for _ in range(iters):
        t = 0.5 * (3 * eye - w @ y)
        y = y @ t
        w = t @ w
    return m @ w / norm.sqrt()


def polar_svd(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(exact orthogonal polar factor U Vᵀ of m = UΣVᵀ, whether the SVD failed).

    Where ``torch.linalg.svd`` fails the released code falls back to R = I for the whole batch; so
    do we, but the caller warns and counts it (``pa_svd_fallback``)."""
    try:
        u, _, vh = torch.linalg.svd(m)
    except RuntimeError:
        return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(m).clone(), True
    return u @ vh, False


def procrustes_rotation(q: torch.Tensor, k: torch.Tensor, solver: str = "polar", iters: int = 5
                        ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(R [B, h, d, d], centred keys K_c [B, h, T, d], whether the SVD solver fell back to R = I)
    for queries/keys [B, h, T, d].

    Token weights π_n = ‖q_n‖ with the CLS weight zeroed, normalised (+1e−6); centroids are
    π-weighted; all T tokens are centred; M = K_cᵀ Q_c (unweighted).
    """
    weights = q.norm(dim=-1)
    weights[..., 0] = 0.0
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
    q_centred = q - (weights[..., None] * q).sum(dim=-2, keepdim=True)
    k_centred = k - (weights[..., None] * k).sum(dim=-2, keepdim=True)
    cross = k_centred.transpose(-1, -2) @ q_centred
    if solver == "polar":
        return polar_newton_schulz(cross, iters), k_centred, False
    if solver == "svd":
        rotation, failed = polar_svd(cross)
        return rotation, k_centred, failed
    raise ValueError(f"pa_solver {solver!r} is not one of {', '.join(SOLVERS)}")


def procrustes_weights(q: torch.Tensor, k: torch.Tensor, scale: float, alpha_kk: float = 0.08,
                       solver: str = "polar", iters: int = 5, diagnostics: bool = False
                       ) -> tuple[torch.Tensor, dict]:
    """PA's attention weights A [B, h, T, T] and, when ``diagnostics``, the rotation's orthogonality
    error and smallest singular value (0-dim tensors: reading them is left to the caller, so no
    device sync happens here); otherwise an empty dict.

    Λ = (s·q)(k R)ᵀ + α_kk·s·K_c K_cᵀ (uncentred keys rotated, centred keys in the key-key term);
    A = softmax(Λ) over all T keys. ``alpha_kk = 0`` drops the key-key term.
    """
    rotation, k_centred, svd_failed = procrustes_rotation(q, k, solver, iters)
    if svd_failed:
        warnings.warn("pa_solver=svd: the SVD failed, so this batch used R = I (no alignment), as the released "
                      "code does; the record counts it (pa_svd_fallback)", RuntimeWarning, stacklevel=2)
    # (k R)ᵀ = Rᵀ kᵀ and K_cᵀ formed contiguous: a transposed view as the right factor of a 4-D
    # matmul is slow on a CPU (PA at T = 589 tokens: 23.9 → 16.3 ms); the key-key term added in place
    logits = (q * scale) @ (rotation.transpose(-1, -2) @ k.transpose(-1, -2))
    if alpha_kk:
        logits.add_(k_centred @ k_centred.transpose(-1, -2).contiguous(), alpha=alpha_kk * scale)
    weights = torch.softmax(logits, dim=-1)
    if not diagnostics:
        return weights, {}
    eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype, device=rotation.device)
    return weights, {
        "pa_orthogonality_error": torch.linalg.matrix_norm(rotation.transpose(-1, -2) @ rotation - eye).mean(),
        "pa_min_singular_value": torch.linalg.svdvals(rotation).amin(dim=-1).mean(),
        "pa_svd_fallback": torch.tensor(float(svd_failed), device=weights.device),
    }

