"""Converters from the official annotation files to the evaluated labels, without mmcv or mmseg.

Each rule is a pure function on label arrays, written from the published label tables and checked
against the upstream converter named in its docstring (docs/datasets.md, "Checking and preparing"). A
:class:`Converter` lists its jobs under the data root (per evaluated image: the official files it
reads, the files it writes); :func:`convert_files` runs them in a process pool. Every output is
written to a temporary name and renamed, the label last, and a job whose outputs all exist is
skipped, so an interrupted prepare resumes by running it again.
"""
from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..benchmarks import BENCHMARKS
from ..errors import UserError


class PrepareError(UserError, RuntimeError):
    """Official files missing or unreadable; the message names the path and what to place there."""


# COCO category ids (1-based) that the 2017 release never uses: 11 thing ids and id 91.
UNUSED_COCO_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
# Raw stuffthingmap values (COCO id − 1) that occur: 80 things (0..89) and 91 stuff (91..181).
COCO_RAW_VALUES = tuple(v for v in range(182) if v + 1 not in UNUSED_COCO_IDS)
COCO_THING_RAW_VALUES = tuple(v for v in COCO_RAW_VALUES if v < 90)

# Cityscapes (cityscapesScripts labels.py): label id → train id for the 19 evaluated classes.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}

# PASCAL Context: the ids, in the 459-class labels.txt (1-based), of the 59 evaluated classes, in
# class order (pc59.txt). MMSegmentation pascal_context.py ``_mapping`` (sorted) and the Detail API.
CONTEXT59_IDS = (2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113,
                 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326,
                 347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
IGNORED_16BIT = 65535
ADE_FULL_SHORT_SIDE = 512  # the detectron2 ADE20K-847 images and labels are resized to this short side


def _lookup(table: dict[int, int], default: int | None, size: int = 256, dtype=np.uint8) -> np.ndarray:
    """A value → value table; ``default`` None keeps values that are not in ``table``."""
    lut = np.arange(size, dtype=dtype) if default is None else np.full(size, default, dtype)
    for old, new in table.items():
        lut[old] = new
    return lut


_COCO_STUFF_LUT = _lookup({raw: train for train, raw in enumerate(COCO_RAW_VALUES)}, 255)
_COCO_10K_LUT = _lookup({0: 0} | {raw + 1: train + 1 for train, raw in enumerate(COCO_RAW_VALUES)}, None)
_CITYSCAPES_LUT = _lookup(CITYSCAPES_TRAIN_IDS, 255)
_CONTEXT60_LUT = _lookup({label_id: index + 1 for index, label_id in enumerate(CONTEXT59_IDS)}, 0, 460)


def coco_stuff_train_ids(raw: np.ndarray) -> np.ndarray:
    """COCO-Stuff-164k trainIds 0..170 from a raw stuffthingmap (value = COCO id − 1, 255 = unlabelled):
    the 171 occurring values in order; anything else (255 included) → 255. Checked against
    MMSegmentation ``tools/dataset_converters/coco_stuff164k.py`` (``clsID_to_trID``)."""
    return _COCO_STUFF_LUT[raw]


def coco_stuff10k_train_ids(mat_labels: np.ndarray) -> np.ndarray:
    """COCO-Stuff-10k labels 0..171 from the ``S`` array of an official ``annotations/<id>.mat``
    (value = COCO id 1..182, 0 = unlabelled): the 171 occurring ids → 1..171 in order, 0 stays 0
    (``reduce_zero_label`` ignores it), the 11 unused ids (never present) are left as they are.
    Checked against MMSegmentation ``tools/dataset_converters/coco_stuff10k.py`` (``clsID_to_trID``)."""
    return _COCO_10K_LUT[mat_labels]


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


def _context_ids(label_map: np.ndarray) -> np.ndarray:
    """The LabelMap as int64, refusing values outside 0..459 (a file that is not PASCAL Context's)."""
    values = np.asarray(label_map)
    if values.size and (values.min() < 0 or values.max() > 459 or not np.all(values == np.round(values))):
        raise ValueError(f"LabelMap values {np.unique(values)[-3:].tolist()}… are not PASCAL Context's 459 class ids")
    return values.astype(np.int64)


def context60_labels(label_map: np.ndarray) -> np.ndarray:
    """PASCAL Context 0..59 from the ``LabelMap`` of an official ``trainval/<id>.mat`` (459-class ids,
    1-based): the 59 evaluated classes → 1..59 in class order, every other class → 0 (background).
    The labels MMSegmentation's ``pascal_context.py`` writes through the Detail API, whose
    annotation holds only these 59 classes plus background."""
    return _CONTEXT60_LUT[_context_ids(label_map)].astype(np.uint8)


def context459_labels(label_map: np.ndarray) -> np.ndarray:
    """PASCAL Context 459 labels 0..458 (16-bit) from an official ``LabelMap``: id − 1, and 0 (never
    present in the release) → 65535, ignored. Checked against CAT-Seg
    ``datasets/prepare_pascal_context_459.py`` (``mask - 1``, saved as a 16-bit TIFF)."""
    label_map = _context_ids(label_map)
    return np.where(label_map > 0, label_map - 1, IGNORED_16BIT).astype(np.uint16)


@lru_cache(maxsize=1)
def _ade_full_lut() -> np.ndarray:
    ids = [int(line) for line in resources.files("pearl").joinpath("resources", "ade847_full_ids.txt")
           .read_text().split()]
    return _lookup({full_id: index for index, full_id in enumerate(ids)}, IGNORED_16BIT, 256 * 26, np.uint16)


def ade847_labels(seg_rgb: np.ndarray) -> np.ndarray:
    """ADE20K-847 labels 0..846 (16-bit) from an ADE20K-full ``<name>_seg.png``: the object class
    index R // 10 · 256 + G, mapped to the 847 evaluated classes (``resources/ade847_full_ids.txt``,
    line k = the full-index id of class k); every other index → 65535, ignored. Checked against
    CAT-Seg ``datasets/prepare_ade20k_full.py`` (MaskFormer's ``ADE20K_SEM_SEG_FULL_CATEGORIES``)."""
    index = (seg_rgb[..., 0].astype(np.int64) // 10) * 256 + seg_rgb[..., 1].astype(np.int64)
    return _ade_full_lut()[index]


def ade_full_size(height: int, width: int, short_side: int = ADE_FULL_SHORT_SIDE) -> tuple[int, int] | None:
    """(H, W) that an ADE20K-full image and its label are resized to (nearest for the label), or None
    when the short side is already at most ``short_side``; Python's round, as CAT-Seg's converter."""
    if width >= height > short_side:
        return short_side, round(width / float(height) * short_side)
    if height >= width > short_side:
        return round(height / float(width) * short_side), short_side
    return None


@dataclass(frozen=True)
class Job:
    dataset: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]  # written in this order; the last (the label) marks the job finished


@dataclass(frozen=True)
class Converter:
    needs: str                                   # the official files it reads (for messages)
    list_jobs: Callable[[str, Path], list[Job]]  # (dataset, data root) → jobs
    outputs: Callable[[Sequence[str]], list]     # sources → one payload per target (array, image or bytes)
    split_file: bool = False                     # writes the benchmark's split file from its jobs
    output_suffix: str = ""                      # of outputs written beside their inputs (never inputs)


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as handle:
        raw = np.array(handle)
    if raw.ndim != 2:
        raise ValueError(f"shape {raw.shape}: expected a single-channel label image")
    return raw


def _read_mat(path: str, key: str) -> np.ndarray:
    from scipy.io import loadmat
    try:
        return np.asarray(loadmat(path)[key])
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        raise ValueError(f"not an official annotation with a {key!r} array ({error})") from None


def _beside_labels(rule: Callable[[np.ndarray], np.ndarray], source_suffix: str, target_suffix: str) -> Converter:
    """A per-file rule on the label files in the benchmark's label folder, output beside the input."""
    def list_jobs(dataset: str, root: Path) -> list[Job]:
        outputs = tuple(c.output_suffix for c in CONVERTERS.values() if c.output_suffix)
        sources = sorted(p for p in (root / BENCHMARKS[dataset].label_dir).rglob(f"*{source_suffix}")
                         if not p.name.endswith(outputs))
        return [Job(dataset, (str(p),), (str(p)[: -len(source_suffix)] + target_suffix,)) for p in sources]
    return Converter(f"{{label_dir}}/*{source_suffix}", list_jobs, lambda sources: [rule(_read_png(sources[0]))],
                     output_suffix=target_suffix)


_CONTEXT_DIR = "VOCdevkit/VOC2010"


def _ids(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"{path} is missing: it comes with {what} (docs/datasets.md, 'Checking and preparing')")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _context_jobs(dataset: str, root: Path) -> list[Job]:
    """One job per image of VOC2010's ``ImageSets/Main/val.txt`` (PASCAL Context's val split) that
    has an official annotation ``trainval/<id>.mat``."""
    base = root / _CONTEXT_DIR
    layout = BENCHMARKS[dataset]
    ids = _ids(base / "ImageSets" / "Main" / "val.txt", "VOC2010 (VOCtrainval_03-May-2010.tar)")
    found = [i for i in ids if (base / "trainval" / f"{i}.mat").is_file()]
    return [Job(dataset, (str(base / "trainval" / f"{i}.mat"),),
                (str(root / layout.label_dir / f"{i}{layout.label_suffix}"),)) for i in found]


def _coco10k_jobs(dataset: str, root: Path) -> list[Job]:
    """One job per id of ``imageLists/test.txt``: the image copied into ``images/test2014``, the
    labels of ``annotations/<id>.mat`` written as ``annotations/test2014/<id>_labelTrainIds.png``."""
    base, layout = root / "coco_stuff10k", BENCHMARKS[dataset]
    ids = _ids(base / "imageLists" / "test.txt", "cocostuff-10k-v1.1.zip")
    return [Job(dataset, (str(base / "images" / f"{i}.jpg"), str(base / "annotations" / f"{i}.mat")),
                (str(root / layout.image_dir / f"{i}.jpg"), str(root / layout.label_dir / f"{i}{layout.label_suffix}")))
            for i in ids if (base / "annotations" / f"{i}.mat").is_file()]


def _ade847_jobs(dataset: str, root: Path) -> list[Job]:
    """One job per ``ADE_val_*.jpg`` under ADE20K-full's ``images/ADE/validation`` with its ``_seg.png``."""
    layout = BENCHMARKS[dataset]
    images = sorted((root / "ADE20K_2021_17_01" / "images" / "ADE" / "validation").rglob("ADE_val_*.jpg"))
    return [Job(dataset, (str(p), str(p)[: -len(".jpg")] + "_seg.png"),
                (str(root / layout.image_dir / p.name), str(root / layout.label_dir / (p.stem + layout.label_suffix))))
            for p in images]


def _coco10k_outputs(sources: Sequence[str]) -> list:
    image, annotation = sources
    return [Path(image).read_bytes(), coco_stuff10k_train_ids(_read_mat(annotation, "S").astype(np.uint8))]


def _ade847_outputs(sources: Sequence[str]) -> list:
    with Image.open(sources[0]) as handle:
        image = np.asarray(handle)
    with Image.open(sources[1]) as handle:
        seg = np.asarray(handle.convert("RGB"))
    labels = ade847_labels(seg)
    if size := ade_full_size(*image.shape[:2]):
        image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        labels = cv2.resize(labels, size[::-1], interpolation=cv2.INTER_NEAREST)
    return [Image.fromarray(image), labels]


def _context_outputs(rule: Callable[[np.ndarray], np.ndarray]) -> Callable[[Sequence[str]], list]:
    return lambda sources: [rule(_read_mat(sources[0], "LabelMap"))]


_CONTEXT60 = Converter(f"{_CONTEXT_DIR}/trainval/<id>.mat (PASCAL Context trainval.tar.gz) and "
                       f"{_CONTEXT_DIR}/ImageSets/Main/val.txt", _context_jobs, _context_outputs(context60_labels),
                       split_file=True)
CONVERTERS: dict[str, Converter] = {
    "coco_stuff": _beside_labels(coco_stuff_train_ids, ".png", "_labelTrainIds.png"),
    "coco_object": _beside_labels(coco_object_ids, ".png", "_instanceTrainIds.png"),
    "cityscapes": _beside_labels(cityscapes_train_ids, "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"),
    "context60": _CONTEXT60,
    "context59": _CONTEXT60,
    "context459": Converter(_CONTEXT60.needs, _context_jobs, _context_outputs(context459_labels), split_file=True),
    "coco_stuff10k": Converter("coco_stuff10k/{images/<id>.jpg, annotations/<id>.mat, imageLists/test.txt} "
                               "(cocostuff-10k-v1.1.zip)", _coco10k_jobs, _coco10k_outputs),
    "ade847": Converter("ADE20K_2021_17_01/images/ADE/validation/**/ADE_val_*.jpg with their _seg.png "
                        "(the ADE20K full release)", _ade847_jobs, _ade847_outputs),
}


def _write(payload, target: str) -> None:
    """Write one output through a temporary name, so that a killed writer leaves no half file."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{os.getpid()}.tmp"
    try:
        if isinstance(payload, bytes):
            Path(tmp).write_bytes(payload)
        else:
            picture = payload if isinstance(payload, Image.Image) else Image.fromarray(payload)
            picture.save(tmp, format={".png": "PNG", ".tif": "TIFF", ".jpg": "JPEG"}[Path(target).suffix])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _convert_one(job: Job) -> bool:
    """Convert one image's files; False when all its outputs already existed (nothing done)."""
    if all(os.path.exists(target) for target in job.targets):
        return False
    try:
        payloads = CONVERTERS[job.dataset].outputs(job.sources)
    except (OSError, ValueError, IndexError) as error:  # IndexError: a value outside the published table
        raise PrepareError(f"cannot convert {job.sources[-1]}: {error}; re-extract it from the official "
                           f"archive") from None
    for payload, target in zip(payloads, job.targets):
        _write(payload, target)
    return True


def conversion_jobs(name: str, root: Path) -> list[Job]:
    """The jobs that prepare benchmark ``name`` under the data root ``root``."""
    return CONVERTERS[name].list_jobs(name, Path(root))


def write_split(name: str, root: Path, jobs: Sequence[Job]) -> Path:
    """The benchmark's split file, listing the ids of ``jobs`` in their order."""
    path = Path(root) / BENCHMARKS[name].split_file
    suffix = BENCHMARKS[name].label_suffix
    _write("".join(Path(job.targets[-1]).name[: -len(suffix)] + "\n" for job in jobs).encode(), str(path))
    return path


def convert_files(jobs: Sequence[Job], workers: int = 0, progress: bool = True) -> int:
    """Run the jobs (``workers`` processes; 0 = one per CPU); returns how many images were converted.

    A worker that dies (killed, out of memory) ends the run with a PrepareError naming the file it
    was converting; every output already written stays, so running it again resumes."""
    workers = workers or os.cpu_count() or 1
    desc = f"converting {jobs[0].dataset}" if jobs else "converting"
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        if workers == 1:
            return sum(bar.update() or _convert_one(job) for job in jobs)
        return _convert_in_pool(jobs, workers, bar)


def _convert_in_pool(jobs: Sequence[Job], workers: int, bar) -> int:
    """The jobs in ``workers`` processes, a few per worker in flight (so a dead worker is noticed
    at once and the files in flight are known)."""
    converted = 0
    pending: dict = {}
    queue = iter(jobs)
    with ProcessPoolExecutor(workers) as pool:
        while True:
            for job in islice(queue, 2 * workers - len(pending)):
                pending[pool.submit(_convert_one, job)] = job
            if not pending:
                return converted
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                try:
                    converted += future.result()
                except BrokenProcessPool:
                    in_flight = sorted({job.sources[-1]} | {other.sources[-1] for other in pending})
                    raise PrepareError(f"a conversion worker died (killed, or out of memory) while converting "
                                       f"{in_flight[0]}" + (f" or one of {len(in_flight) - 1} other file(s) in flight"
                                                            if len(in_flight) > 1 else "")
                                       + "; what was written is kept: run the same command again to resume "
                                         "(--workers 1 uses less memory)") from None
                bar.update()
