"""Segmentation metrics as MMSeg ``IoUMetric`` computes them (docs/protocol.md §9, docs/engineering.md §5).

One int64 confusion matrix per run, accumulated on the evaluation device; rows = ground truth,
columns = prediction; pixels whose ground truth is outside 0..C−1 are dropped: the ignored value
(255, or 65535 in 16-bit label files), which the datasets let through and nothing else (they check
every label's values), so this is MMSeg's ``gt != ignore_index`` for any label width.
"""
from __future__ import annotations

import numpy as np
import torch

PIXELS_PER_UPDATE = 2 ** 22


class ConfusionMatrix:
    """Accumulates cm[gt, pred] over a whole dataset."""

    def __init__(self, num_classes: int, device: str | torch.device = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor) -> "ConfusionMatrix":
        """Wrap an existing [C, C] int64 matrix (e.g. one summed over workers)."""
        cm = cls(matrix.shape[0], matrix.device)
        cm.matrix = matrix.to(torch.int64)
        return cm

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Add one image: pred and gt [H, W] integer maps of the same size."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(gt.shape)} differ in size")
        pred, gt = pred.flatten(), gt.flatten()
        c = self.num_classes
        for start in range(0, pred.numel(), PIXELS_PER_UPDATE):  # bounded temporaries on huge images
            chunk_pred = pred[start:start + PIXELS_PER_UPDATE].to(self.matrix.device).long()
            chunk_gt = gt[start:start + PIXELS_PER_UPDATE].to(self.matrix.device).long()
            # ignored pixels counted in one extra cell and dropped: no boolean indexing, so no device sync
            cell = torch.where((chunk_gt >= 0) & (chunk_gt < c), chunk_gt * c + chunk_pred, c * c)
            counts = torch.zeros(c * c + 1, dtype=torch.int64, device=cell.device)
            self.matrix += counts.index_add_(0, cell, torch.ones_like(cell))[:-1].view(c, c)

    def all_reduce(self) -> None:
        """Sum the matrix over a torch.distributed group (no-op when not initialised)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def per_class_iou(self) -> np.ndarray:
        """IoU_c (NaN where the union is empty); float64."""
        cm = self.matrix.double().cpu()
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            return (inter / union).numpy()

    def summary(self) -> dict:
        """mIoU, aAcc (= the paper's pAcc), mAcc ×100, unrounded; per-class IoU ×100 (NaN → None)."""
        cm = self.matrix.double().cpu()
        inter, label = cm.diag(), cm.sum(1)
        iou = self.per_class_iou()
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = (inter / label).numpy()
        total = label.sum().item()
        return {
            "mIoU": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan"),
            "aAcc": float(inter.sum().item() / total * 100) if total else float("nan"),
            "mAcc": float(np.nanmean(acc) * 100) if np.isfinite(acc).any() else float("nan"),
            "per_class_iou": [None if np.isnan(v) else float(v * 100) for v in iou],
        }
