"""PEARL's text-aware Laplacian propagation (TLP), released behaviour and the paper's variants.

docs/pearl.md §3, after PGSmall/PEARL@c26062b ``pearl/prop.py`` (``TLP``). Everything here is fp32.
Shapes: logits [B, Q, H, W], guide image [B, 3, H, W] (normalised RGB), text affinity G [Q, Q].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..params import default


@dataclass(frozen=True)
class TLPConfig:
    """TLP's settings; field ``f`` is the parameter ``tlp_f`` (``lambda_`` → ``tlp_lambda``), whose
    default, meaning and valid values ``pearl.params`` defines (the released constants, docs/pearl.md §3.3)."""

    site: str = default("tlp_site")
    grid: int = default("tlp_grid")
    cg_iters: int = default("tlp_cg_iters")
    pool: str = default("tlp_pool")
    softmax_temp: float = default("tlp_softmax_temp")
    quadform: str = default("tlp_quadform")
    grad_norm: str = default("tlp_grad_norm")
    edge_clamp: bool = default("tlp_edge_clamp")
    tau: float = default("tlp_tau")
    lambda_: float = default("tlp_lambda")
    tau_s: float = default("tlp_tau_s")
    beta: float = default("tlp_beta")
    kappa: float = default("tlp_kappa")
    eps: float = default("tlp_eps")


def text_affinity(prototypes: torch.Tensor, tau_s: float = 0.5, beta: float = 10.0) -> torch.Tensor:
    """G [Q, Q]: row-softmax of prototype cosines / τ_s, + β·I, row-normalised (+1e−6).

    Computed in the prototypes' dtype (fp16 upstream) and returned as fp32 (docs/pearl.md §3.1).
    """
    unit = prototypes / prototypes.norm(dim=-1, keepdim=True)
    affinity = torch.softmax(unit @ unit.T / tau_s, dim=-1)
    affinity = affinity + beta * torch.eye(affinity.shape[0], dtype=affinity.dtype, device=affinity.device)
    return (affinity / (affinity.sum(dim=-1, keepdim=True) + 1e-6)).float()


def pooling_strides(height: int, width: int, grid: int) -> tuple[int, int]:
    """Released integer strides max(1, round(H/grid)) with Python's round-half-to-even."""
    return max(1, round(height / grid)), max(1, round(width / grid))


def pool_to_grid(x: torch.Tensor, cfg: TLPConfig) -> tuple[torch.Tensor, bool]:
    """(x [B, C, h, w] on TLP's grid, whether it was pooled) for x [B, C, H, W].

    Channels are pooled independently, so pooling logits in chunks of queries gives the same grid.
    """
    height, width = x.shape[-2:]
    if cfg.pool == "adaptive":
        return F.adaptive_avg_pool2d(x, (cfg.grid, cfg.grid)), True
    stride = pooling_strides(height, width, cfg.grid)
    if stride == (1, 1):
        return x, False
    return F.avg_pool2d(x, stride, stride), True


def resize_matrix(size_in: int, size_out: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[size_out, size_in]: PyTorch's 1-D linear resize (align_corners=False) as a matrix, built by
    resizing the identity, so its weights are the interpolation's own. Bilinear resizing is this
    along each axis."""
    eye = torch.eye(size_in, dtype=dtype, device=device)[:, None, :]
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[:, 0, :].T


def stride_pool_matrix(size: int, stride: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """[size // stride, size]: average pooling with kernel = stride, floor mode, as a matrix."""
    rows = torch.arange(size // stride, device=device)
    pool = torch.zeros(size // stride, size, dtype=dtype, device=device)
    for offset in range(stride):
        pool[rows, rows * stride + offset] = 1.0 / stride
    return pool


def pool_resized(source: torch.Tensor, size: tuple[int, int], cfg: TLPConfig) -> torch.Tensor:
    """TLP's integer-stride pooling of ``source`` [B, C, h, w] bilinearly resized to ``size`` (H, W),
    without the size-(H, W) tensor: both steps are linear and separable, so the pooled grid is
    A_h · source · A_wᵀ with A = pooling · resize per axis (equal to resizing then pooling up to
    float rounding, about 1e−7 of the logits). [B, C, H // s_h, W // s_w]."""
    height, width = size
    stride_h, stride_w = pooling_strides(height, width, cfg.grid)
    like = dict(dtype=source.dtype, device=source.device)
    along_h = stride_pool_matrix(height, stride_h, **like) @ resize_matrix(source.shape[-2], height, **like)
    along_w = stride_pool_matrix(width, stride_w, **like) @ resize_matrix(source.shape[-1], width, **like)
    return along_h @ source @ along_w.T


def _pair_terms(p: torch.Tensor, affinity: torch.Tensor, quadform: str):
    """(u [B, h, w], Gp [B, Q, h, w]): agreement and the G-weighted probabilities.

    ``diag`` uses only G's diagonal (the released einsum with a repeated subscript); ``full`` the
    whole matrix, u = pᵀGp (docs/pearl.md §6).
    """
    if quadform == "diag":
        weighted = torch.diagonal(affinity)[None, :, None, None] * p
    else:
        weighted = torch.einsum("cd,bdhw->bchw", affinity, p)
    return (p * weighted).sum(dim=1), weighted


def edge_weights(p: torch.Tensor, weighted: torch.Tensor, guide: torch.Tensor, cfg: TLPConfig
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_h [B, h, w−1], w_v [B, h−1, w]): image edge term times the text gate, clamped."""
    gray = 0.299 * guide[:, 0] + 0.587 * guide[:, 1] + 0.114 * guide[:, 2]
    grad_x = (gray[:, :, 1:] - gray[:, :, :-1]).abs()
    grad_y = (gray[:, 1:, :] - gray[:, :-1, :]).abs()
    if cfg.grad_norm == "mean":
        grad_x = grad_x / (grad_x.mean(dim=(1, 2), keepdim=True) + 1e-6)
        grad_y = grad_y / (grad_y.mean(dim=(1, 2), keepdim=True) + 1e-6)
    gate_x = (p[:, :, :, 1:] * weighted[:, :, :, :-1]).sum(dim=1)
    gate_y = (p[:, :, 1:, :] * weighted[:, :, :-1, :]).sum(dim=1)
    w_h = torch.exp(-cfg.kappa * grad_x) * (1 + cfg.lambda_ * gate_x.clamp(0, 1))
    w_v = torch.exp(-cfg.kappa * grad_y) * (1 + cfg.lambda_ * gate_y.clamp(0, 1))
    if cfg.edge_clamp:
        w_h, w_v = w_h.clamp(0, 1), w_v.clamp(0, 1)
    return w_h, w_v


def laplacian(x: torch.Tensor, w_h: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """(𝓛X)(i) = Σ_{j∈N4(i)} w_ij (X(i) − X(j)) for x [B, Q, h, w], the same weights per channel."""
    diff_h = w_h[:, None] * (x[..., :, :-1] - x[..., :, 1:])
    diff_v = w_v[:, None] * (x[..., :-1, :] - x[..., 1:, :])
    out = torch.zeros_like(x)
    out[..., :, :-1] += diff_h
    out[..., :, 1:] -= diff_h
    out[..., :-1, :] += diff_v
    out[..., 1:, :] -= diff_v
    return out


class _System:
    """The operator X ↦ ρ⊙X + τ𝓛X with its work buffers allocated once, for the CG loop. Every
    product and sum is the one ``laplacian`` and the plain expression compute, in the same order,
    so the results are the same bits."""

    def __init__(self, rho: torch.Tensor, w_h: torch.Tensor, w_v: torch.Tensor, tau: float, like: torch.Tensor):
        self.rho, self.w_h, self.w_v, self.tau = rho, w_h[:, None], w_v[:, None], tau
        self.out = torch.empty_like(like)
        self.laplace = torch.empty_like(like)
        self.diff_h = torch.empty_like(like[..., :, :-1])
        self.diff_v = torch.empty_like(like[..., :-1, :])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """ρ⊙x + τ𝓛x, in a buffer reused by the next call."""
        diff_h = torch.sub(x[..., :, :-1], x[..., :, 1:], out=self.diff_h).mul_(self.w_h)
        diff_v = torch.sub(x[..., :-1, :], x[..., 1:, :], out=self.diff_v).mul_(self.w_v)
        laplace = self.laplace.zero_()
        laplace[..., :, :-1] += diff_h
        laplace[..., :, 1:] -= diff_h
        laplace[..., :-1, :] += diff_v
        laplace[..., 1:, :] -= diff_v
        return torch.mul(self.rho, x, out=self.out).add_(laplace.mul_(self.tau))


def conjugate_gradient(rho: torch.Tensor, z: torch.Tensor, w_h: torch.Tensor, w_v: torch.Tensor,
                       tau: float, iters: int) -> torch.Tensor:
    """Released CG on (diag ρ + τ𝓛) X = ρ ⊙ Z from X0 = Z, one scalar step per image, no early stop.

    Allocation-free inside the loop (buffers reused); the arithmetic is the released order."""
    apply = _System(rho, w_h, w_v, tau, z)
    scratch = torch.empty_like(z)

    def dot(a, b):
        return torch.mul(a, b, out=scratch).sum(dim=(1, 2, 3), keepdim=True)

    x = z.clone()
    residual = rho * z - apply(x)
    direction = residual.clone()
    r_old = dot(residual, residual)
    for _ in range(iters):
        a_dir = apply(direction)
        step = r_old / (dot(direction, a_dir) + 1e-12)
        x.add_(torch.mul(direction, step, out=scratch))
        residual.sub_(torch.mul(a_dir, step, out=scratch))
        r_new = dot(residual, residual)
        direction.mul_(r_new / (r_old + 1e-12)).add_(residual)
        r_old = r_new
    return x


def propagate(z: torch.Tensor, guide: torch.Tensor, affinity: torch.Tensor, cfg: TLPConfig = TLPConfig(),
              info: dict | None = None) -> torch.Tensor:
    """Refined logits X [B, Q, h, w] from pooled logits Z [B, Q, h, w] and guide [B, 3, h, w] (steps 3–13).

    With an ``info`` dict, the diagnostics (confidence floor share, ρ, edge weights, the CG
    residual) are added to it as 0-dim tensors."""
    p = torch.softmax(cfg.softmax_temp * z, dim=1)
    conf = p.amax(dim=1)
    agreement, weighted = _pair_terms(p, affinity, cfg.quadform)
    rho = (conf.clamp_min(cfg.eps) ** 2 * (1 + agreement.clamp(0, 1)))[:, None]
    w_h, w_v = edge_weights(p, weighted, guide, cfg)
    x = conjugate_gradient(rho, z, w_h, w_v, cfg.tau, cfg.cg_iters)
    if info is not None:  # 0-dim tensors: no device sync here
        rhs = rho * z
        res = (rhs - rho * x - cfg.tau * laplacian(x, w_h, w_v)).norm() / rhs.norm().clamp_min(1e-12)
        edges = torch.cat([w_h.flatten(), w_v.flatten()])
        info.update(tlp_low_confidence=(conf < cfg.eps).float().mean(), tlp_rho_mean=rho.mean(),
                    tlp_rho_std=rho.std() if rho.numel() > 1 else rho.new_zeros(()),
                    tlp_edge_weight_mean=edges.mean() if edges.numel() else rho.new_zeros(()),
                    tlp_cg_relative_residual=res)
    return x


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """TLP runs in fp32 (fp64 inputs stay fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tlp(logits: torch.Tensor, guide: torch.Tensor, affinity: torch.Tensor, cfg: TLPConfig = TLPConfig(),
        info: dict | None = None) -> torch.Tensor:
    """Refined logits [B, Q, H, W] (fp32; fp64 inputs stay fp64) by TLP; docs/pearl.md §3.2 steps 1–14."""
    dtype = working_dtype(logits.dtype)
    logits, guide, affinity = logits.to(dtype), guide.to(dtype), affinity.to(dtype)
    height, width = logits.shape[-2:]
    z, pooled = pool_to_grid(logits, cfg)
    small_guide, _ = pool_to_grid(guide, cfg)
    x = propagate(z, small_guide, affinity, cfg, info)
    if pooled:
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    return x
