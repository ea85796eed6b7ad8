"""Is a benchmark ready to evaluate? One line per dataset, naming what is missing or wrong.

Checks, cheapest first: the folders and split file, every listed image and label file present
(the dataset's own checks), the image count against the official split, every label the size of its
image (from the file headers, for all files), and a decoded sample (``deep``: every file) for
truncated or damaged files and label values outside the class range.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import CHECK_HINT, DatasetError, build_dataset

SAMPLE = 20  # files decoded without ``deep``


@dataclass
class Report:
    dataset: str
    ready: bool
    detail: str

    def line(self) -> str:
        return f"{'ok       ' if self.ready else 'NOT READY'} {self.dataset}: {self.detail}"


def _size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as handle:
            return handle.size
    except (OSError, ValueError):
        return None


def check(name: str, root: str | Path, deep: bool = False) -> Report:
    """The readiness of benchmark ``name`` under ``root``."""
    try:
        dataset = build_dataset(name, root)
    except DatasetError as error:  # the check itself: no advice to run it
        return Report(name, False, str(error).replace(CHECK_HINT.format(name=name), ""))
    problems = []
    if dataset.total_images != dataset.expected_images:
        problems.append(f"{dataset.total_images} images, the official split has {dataset.expected_images}")
    mismatched = [(image, label) for _, image, label in dataset.items if _size(image) != _size(label)]
    if mismatched:
        image, label = mismatched[0]
        problems.append(f"{len(mismatched)} label(s) not the size of their image (e.g. {label}: {_size(label)} vs "
                        f"{image}: {_size(image)})")
    indices = range(len(dataset)) if deep else np.unique(np.linspace(0, len(dataset) - 1, SAMPLE).round()).astype(int)
    bad = []
    for index in indices:
        try:
            dataset[index]
        except DatasetError as error:
            bad.append(str(error))
    if bad:
        problems.append(f"{len(bad)} of {len(indices)} decoded files are unusable (e.g. {bad[0]})")
    if problems:
        return Report(name, False, "; ".join(problems))
    checked = "every file decoded" if deep else f"{len(indices)} decoded as a sample (--deep: all)"
    return Report(name, True, f"{len(dataset)} images with labels under {dataset.root}; {checked}")
