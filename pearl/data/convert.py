"""Converters from the official label files to the evaluated ones, without mmcv or mmseg.

Each rule is a pure function on a label array, written from the published label tables and
checked against the upstream converter named in its docstring (docs/datasets.md, "Preparing").
:func:`convert_files` applies one to many files with a process pool; each output is written to a
temporary name and renamed, and existing outputs are kept, so an interrupted run resumes by
running it again.
"""
from __future__ import annotations

import os
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

# COCO category ids (1-based) that the 2017 release never uses: 11 thing ids and id 91.
UNUSED_COCO_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
# Raw stuffthingmap values (COCO id − 1) that occur: 80 things (0..89) and 91 stuff (91..181).
COCO_RAW_VALUES = tuple(v for v in range(182) if v + 1 not in UNUSED_COCO_IDS)
COCO_THING_RAW_VALUES = tuple(v for v in COCO_RAW_VALUES if v < 90)

# Cityscapes (cityscapesScripts labels.py): label id → train id for the 19 evaluated classes.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _lookup(table: dict[int, int], default: int) -> np.ndarray:
    lut = np.full(256, default, np.uint8)
    for old, new in table.items():
        lut[old] = new
    return lut


_COCO_STUFF_LUT = _lookup({raw: train for train, raw in enumerate(COCO_RAW_VALUES)}, 255)
_CITYSCAPES_LUT = _lookup(CITYSCAPES_TRAIN_IDS, 255)


def coco_stuff_train_ids(raw: np.ndarray) -> np.ndarray:
    """COCO-Stuff-164k trainIds 0..170 from a raw stuffthingmap (value = COCO id − 1, 255 = unlabelled):
    the 171 occurring values in order; anything else (255 included) → 255. Checked against
    MMSegmentation ``tools/dataset_converters/coco_stuff164k.py`` (``clsID_to_trID``)."""
    return _COCO_STUFF_LUT[raw]


def coco_object_ids(raw: np.ndarray) -> np.ndarray:
    """COCO-Object labels from a raw stuffthingmap: the 80 thing values → 1..80 in order, every value
    above 90 (all stuff and the 255 of unlabelled pixels) → 0, the never-occurring values ≤ 90 left as
    they are. Checked against PEARL ``convert_dataset/convert_coco_object.py`` (GroupViT's rule)."""
    out = raw.copy()
    for index, value in enumerate(COCO_THING_RAW_VALUES):
        out[raw == value] = index + 1
    out[raw > 90] = 0
    return out


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes trainIds 0..18 from a gtFine ``_labelIds.png``; every other id → 255. Checked against
    cityscapesScripts ``helpers/labels.py`` and ``createTrainIdLabelImgs.py`` (as MMSeg's cityscapes.py)."""
    return _CITYSCAPES_LUT[label_ids]


RULES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str, str]] = {
    # dataset → (rule, input suffix, output suffix), both in the dataset's label folder
    "coco_stuff": (coco_stuff_train_ids, ".png", "_labelTrainIds.png"),
    "coco_object": (coco_object_ids, ".png", "_instanceTrainIds.png"),
    "cityscapes": (cityscapes_train_ids, "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"),
}


def _convert_one(job: tuple[str, str, str]) -> bool:
    """Convert one file; False when its output already existed (nothing done)."""
    name, source, target = job
    if os.path.exists(target):
        return False
    with Image.open(source) as handle:
        raw = np.array(handle)
    if raw.ndim != 2:
        raise ValueError(f"{source} has shape {raw.shape}: expected a single-channel label image")
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        Image.fromarray(RULES[name][0](raw.astype(np.uint8))).save(tmp, format="PNG")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return True


def conversion_jobs(name: str, label_dir: Path) -> list[tuple[str, str, str]]:
    """(dataset, input, output) for every input label file under ``label_dir``."""
    _, source_suffix, target_suffix = RULES[name]
    sources = sorted(p for p in label_dir.rglob(f"*{source_suffix}")
                     if not any(p.name.endswith(s) for _, _, s in RULES.values() if s != source_suffix))
    return [(name, str(p), str(p)[: -len(source_suffix)] + target_suffix) for p in sources]


def convert_files(jobs: Sequence[tuple[str, str, str]], workers: int = 0, progress: bool = True) -> int:
    """Run the jobs (``workers`` processes; 0 = one per CPU); returns how many outputs were written."""
    workers = workers or os.cpu_count() or 1
    desc = f"converting {jobs[0][0]}" if jobs else "converting"
    if workers == 1:
        done = [_convert_one(job) for job in tqdm(jobs, desc=desc, disable=not progress)]
    else:
        with Pool(workers) as pool:
            done = list(tqdm(pool.imap(_convert_one, jobs, chunksize=16), total=len(jobs), desc=desc,
                             disable=not progress))
    return sum(done)
