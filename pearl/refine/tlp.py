"""PEARL's text-aware Laplacian propagation (TLP), released behaviour and the paper's variants.

docs/pearl.md §3, after PGSmall/PEARL@c26062b ``pearl/prop.py`` (``TLP``). Everything here is fp32.
Shapes: logits [B, Q, H, W], guide image [B, 3, H, W] (normalised RGB), text affinity G [Q, Q].
``TLPRefiner`` is TLP as a registered refiner, with its memory and batching strategies
(docs/memory.md, docs/speed.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..fused import OriginalSizeLogits, WindowedImage, fits_whole, per_slab, upsample
from ..params import default
from . import register
from .base import Guide, Refiner, RefinerContext

BATCHED_TLP_VALUES = 2 ** 26  # on CUDA: query × pixel values of images whose post-fusion TLP is one batched solve


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


@register
class TLPRefiner(Refiner):
    """TLP after the fusion (released) or on each window before it (``tlp_site=per_window``, the paper)."""

    name = "tlp"
    Config = TLPConfig
    config_prefix = "tlp_"
    order = 20  # after PAMR

    def __init__(self, config: TLPConfig, context: RefinerContext) -> None:
        super().__init__(config, context)
        self.affinity = text_affinity(context.prototypes, config.tau_s, config.beta)

    @property
    def per_window(self) -> bool:
        return self.config.site == "per_window"

    def together_values(self) -> int:
        # one batched solve for equal-size images on a GPU (fewer kernel launches); on a CPU the
        # batched tensors fall out of the caches and it was slower (docs/speed.md §2)
        return BATCHED_TLP_VALUES if self.context.device.type == "cuda" and not self.per_window else 0

    def refine_window(self, logits: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        return tlp(logits[None], guide[None].float(), self.affinity, self.config)[0].to(self.context.dtype)

    def refine(self, item: WindowedImage, logits: OriginalSizeLogits, guide: Guide, info: dict
               ) -> OriginalSizeLogits:
        """Above ``FULL_SIZE_BUDGET`` the input is resized and pooled a few queries at a time and the
        output stays on TLP's grid (``OriginalSizeLogits`` resizes it per slab)."""
        info = info if self.context.diagnostics else None
        if self.pools_before_resizing(logits):
            return self._from_sources([item], [logits], info)[0]
        if fits_whole(logits.values):
            return self._whole(logits, guide(), info)
        return self._chunked(item, logits, info)

    def refine_together(self, items: list[WindowedImage], fused: list[OriginalSizeLogits]
                        ) -> list[OriginalSizeLogits] | None:
        if len({tuple(logits.size) for logits in fused}) != 1 or not all(fits_whole(x.values) for x in fused):
            return None
        if all(self.pools_before_resizing(logits) for logits in fused):
            return self._from_sources(items, fused, None)
        size, dtype = items[0].ori_shape, self.context.dtype
        guide = torch.cat([item.guide() for item in items])
        refined = tlp(torch.stack([logits.full() for logits in fused]), guide, self.affinity, self.config)
        return [OriginalSizeLogits(one.to(dtype), size, dtype) for one in refined]

    def pools_before_resizing(self, logits: OriginalSizeLogits) -> bool:
        """Whether TLP's pooled input can be computed from the fused logits before their resize to the
        original size (``pool_resized``): fp32 throughout (in lower precision the released code rounds
        the resized logits, which this path never forms), integer-stride pooling that pools, and a
        resize that resizes."""
        return (self.context.dtype == torch.float32 and logits.source.dtype == torch.float32
                and self.config.pool == "int_stride"
                and pooling_strides(*logits.size, self.config.grid) != (1, 1) and logits.resized)

    def _from_sources(self, items: list[WindowedImage], fused: list[OriginalSizeLogits], info: dict | None
                      ) -> list[OriginalSizeLogits]:
        """TLP of equal-size images on the grid pooled straight from their fused logits and inputs (no
        original-size input tensor is formed). Each refined grid [Q, h, w] is returned as the original-size
        logits it is resized to (fp32, then cast, as ``tlp`` does), resized when decided, as fused logits
        are without TLP: a batch holds grids, not original-size tensors."""
        size, cfg = items[0].ori_shape, self.config
        z = torch.cat([pool_resized(logits.source[None], size, cfg) for logits in fused])
        guide = torch.cat([pool_resized(item.input.float()[None], size, cfg) for item in items])
        return [OriginalSizeLogits(one, size, self.context.dtype)
                for one in propagate(z, guide, self.affinity, cfg, info)]

    def _whole(self, logits: OriginalSizeLogits, guide: torch.Tensor, info: dict | None) -> OriginalSizeLogits:
        refined = tlp(logits.full()[None], guide, self.affinity, self.config, info)[0]
        return OriginalSizeLogits(refined.to(self.context.dtype), logits.size, self.context.dtype)

    def _chunked(self, item: WindowedImage, logits: OriginalSizeLogits, info: dict | None) -> OriginalSizeLogits:
        """TLP with its original-size input built a few channels at a time (channels resize and pool
        independently, so the pooled grid equals the whole computation's)."""
        dtype, model_dtype = working_dtype(logits.dtype), self.context.dtype
        step = per_slab(logits.size[0] * logits.size[1])

        def pooled(channels, count: int) -> torch.Tensor:
            return torch.cat([pool_to_grid(channels(slice(start, start + step))[None].to(dtype), self.config)[0]
                              for start in range(0, count, step)], dim=1)

        z = pooled(logits.full, logits.source.shape[0])
        guide = pooled(lambda rgb: upsample(item.input[rgb].float(), item.ori_shape), 3)
        refined = propagate(z, guide, self.affinity.to(dtype), self.config, info)[0]
        if tuple(refined.shape[1:]) == tuple(logits.size):  # not pooled: already full size
            return OriginalSizeLogits(refined.to(model_dtype), logits.size, model_dtype)
        return OriginalSizeLogits(refined, logits.size, model_dtype)

