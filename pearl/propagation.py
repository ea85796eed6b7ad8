"""Label propagation on an affinity graph, as LPOSS solves it: Y* = (I − α·D^−½ W D^−½)⁻¹ Y.

vladan-stojnic/LPOSS@e489a74 ``segmentation/evaluation/lposs_eval.py`` builds W with faiss (a kNN
graph over patches) or by pixel neighbourhoods, normalises it with cupyx (``normalize_connection_graph``)
and solves each class column with ``cupyx.scipy.sparse.linalg.cg``; here the same in torch, on any
device (docs/methods.md §12). A leaf module: pure functions of tensors. The graph is built in fp32 and
the system solved in fp64, as upstream's is (its ``eye`` is float64, so ``I − α·Wn`` and the solve are).
Shapes: labels Y [N, Q] (N graph nodes, Q queries), node features [N, C], positions [N, 2].
"""
from __future__ import annotations

from typing import Callable

import torch

MatVec = Callable[[torch.Tensor], torch.Tensor]


def conjugate_gradient(matvec: MatVec, b: torch.Tensor, iters: int, tol: float) -> torch.Tensor:
    """x [N, Q] with matvec(x) ≈ b [N, Q] for a symmetric positive-definite operator, every column its
    own conjugate-gradient solve as ``cupyx.scipy.sparse.linalg.cg(A, b, tol=tol, maxiter=iters)``
    runs it: from x₀ = 0, at most ``iters`` steps, a column stopping after the step whose residual
    norm is ≤ tol·‖b‖ (a zero column stays zero). Columns are solved together, in one matvec a step."""
    x = torch.zeros_like(b)
    residual = b.clone()
    threshold = tol * b.norm(dim=0)
    active = threshold > 0
    direction = rho_before = None
    for _ in range(iters):
        if not bool(active.any()):
            break
        rho = (residual * residual).sum(dim=0)
        direction = residual if direction is None else residual + (rho / rho_before) * direction
        direction = torch.where(active, direction, torch.zeros_like(direction))  # a stopped column moves no more
        product = matvec(direction)
        step = torch.where(active, rho / (direction * product).sum(dim=0), torch.zeros_like(rho))
        x = x + step * direction
        residual = residual - step * product
        rho_before = rho
        active = active & (residual.norm(dim=0) > threshold)
    return x


def nearest_neighbours(features: torch.Tensor, k: int, rows_per_chunk: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities [N, k], indices [N, k]): each node's k largest inner products with all nodes,
    itself included, in descending order (faiss ``knn_gpu`` with ``METRIC_INNER_PRODUCT``, exact);
    k is capped at N. Computed a chunk of rows at a time, never the whole N×N matrix."""
    k = min(k, features.shape[0])
    chunks = [torch.topk(features[start:start + rows_per_chunk] @ features.T, k, dim=1)
              for start in range(0, features.shape[0], rows_per_chunk)]
    return torch.cat([chunk.values for chunk in chunks]), torch.cat([chunk.indices for chunk in chunks])


def knn_affinity(features: torch.Tensor, positions: torch.Tensor, k: int, gamma: float, sigma: float,
                 distance_power: float, rows_per_chunk: int = 1024) -> torch.Tensor:
    """W [N, N] sparse: for each node i and each of its k nearest neighbours j (``nearest_neighbours``
    of the unit ``features``), max(0, f_i·f_j)^γ · exp(−σ·‖p_i − p_j‖^power), p the ``positions``
    (``get_lposs_laplacian``). Not yet symmetric (``symmetric_normalised`` adds Wᵀ). Distances are
    ``torch.cdist``'s, as upstream takes them from one ``cdist`` of all positions."""
    similarities, neighbours = nearest_neighbours(features, k, rows_per_chunk)
    distances = torch.cat([torch.cdist(positions[start:start + rows_per_chunk][None], positions[None])[0]
                           .gather(1, neighbours[start:start + rows_per_chunk])
                           for start in range(0, positions.shape[0], rows_per_chunk)])
    weights = similarities.clamp(min=0) ** gamma * torch.exp(-sigma * distances ** distance_power)
    rows = torch.arange(features.shape[0], device=features.device).repeat_interleave(neighbours.shape[1])
    size = (features.shape[0],) * 2
    return torch.sparse_coo_tensor(torch.stack([rows, neighbours.flatten()]), weights.flatten(), size,
                                   check_invariants=False)


def symmetric_normalised(affinity: torch.Tensor) -> torch.Tensor:
    """D^−½ (W + Wᵀ − diag) D^−½ of a sparse W [N, N] (coalesced; repeated entries summed, as a
    scipy/cupy sparse matrix sums them), D the row sums, a row summing to 0 taken as 1
    (``normalize_connection_graph``)."""
    symmetric = (affinity + affinity.t()).coalesce()
    rows, cols = symmetric.indices()
    off_diagonal = rows != cols
    rows, cols, values = rows[off_diagonal], cols[off_diagonal], symmetric.values()[off_diagonal]
    degree = torch.zeros(symmetric.shape[0], dtype=values.dtype, device=values.device).index_add_(0, rows, values)
    scale = degree.masked_fill(degree == 0, 1).rsqrt()
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), scale[rows] * values * scale[cols], symmetric.shape,
                                   check_invariants=False).coalesce()


def propagate(normalised: torch.Tensor | MatVec, labels: torch.Tensor, alpha: float, iters: int,
              tol: float) -> torch.Tensor:
    """Y* [N, Q] fp64 solving (I − α·Wn) Y* = Y for ``labels`` Y [N, Q] by ``conjugate_gradient`` in fp64;
    Wn the normalised affinity as a sparse [N, N] matrix, or as its product with an fp64 [N, Q] matrix."""
    if isinstance(normalised, torch.Tensor):
        matrix = normalised.to(torch.float64)
        normalised = lambda x: torch.sparse.mm(matrix, x)  # noqa: E731
    return conjugate_gradient(lambda x: x - alpha * normalised(x), labels.to(torch.float64), iters, tol)
