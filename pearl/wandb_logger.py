"""Optional Weights & Biases logging of one run. A wandb failure never fails the evaluation.

One wandb run per evaluation job, finished at the end (a Hydra sweep runs many jobs in one
process; docs/engineering.md §3). Honours ``WANDB_MODE`` (online / offline / disabled).
"""
from __future__ import annotations

import warnings

import numpy as np


class WandbLogger:
    def __init__(self, project: str, group: str | None, name: str, job_type: str, tags: list[str], config: dict,
                 directory: str | None, max_images: int = 4) -> None:
        self.max_images, self.logged_images, self.run = max_images, 0, None
        try:
            import wandb
            self.wandb = wandb
            self.run = wandb.init(project=project, group=group, name=name, job_type=job_type, tags=tags,
                                  config=config, dir=directory, reinit="finish_previous")
        except Exception as error:  # noqa: BLE001 — logging must never stop an evaluation
            warnings.warn(f"wandb.init failed, continuing without wandb: {error}", RuntimeWarning)

    def _safe(self, action, what: str) -> None:
        if self.run is None:
            return
        try:
            action()
        except Exception as error:  # noqa: BLE001
            warnings.warn(f"wandb {what} failed, continuing: {error}", RuntimeWarning)

    def log_prediction(self, image: np.ndarray, pred: np.ndarray, gt: np.ndarray | None, class_names: list[str],
                       caption: str) -> None:
        """A few masked images (ids must fit 8-bit PNG masks: ≤ 255 classes)."""
        if self.logged_images >= self.max_images or len(class_names) > 255:
            return
        self.logged_images += 1
        labels = {i: name for i, name in enumerate(class_names)} | {255: "ignore"}
        masks = {"prediction": {"mask_data": pred.astype(np.uint8), "class_labels": labels}}
        if gt is not None:
            masks["ground_truth"] = {"mask_data": gt.astype(np.uint8), "class_labels": labels}
        self._safe(lambda: self.run.log({"predictions": self.wandb.Image(image, masks=masks, caption=caption)}),
                   "image logging")

    def finish(self, record, class_names: list[str], per_class_iou: list) -> None:
        def action():
            for key in ("mIoU", "aAcc", "mAcc", "images_per_second"):
                self.run.summary[key] = getattr(record, key)
            rows = [[name, iou] for name, iou in zip(class_names, per_class_iou)]
            table = self.wandb.Table(columns=["class", "IoU"], data=rows)
            self.run.log({"per_class_iou": table, "mIoU": record.mIoU, "aAcc": record.aAcc})
        self._safe(action, "summary logging")
        self._safe(lambda: self.run.finish(), "finish")
