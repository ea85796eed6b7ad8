"""Small synthetic datasets written in the real on-disk layouts, with real PNG label files.

Used by the tests and for smoke runs without the benchmarks:

    python -m pearl.data.synthetic --root data/synthetic --datasets voc21,ade20k --images 4
    python run.py dataset=voc21 data_root=data/synthetic model=tiny

Images are coloured rectangles (one colour per class, plus noise); labels follow each dataset's
raw convention (VOC palette PNG with 255 boundaries, ADE with 0 = "other", Cityscapes trainIds,
COCO trainIds and instanceTrainIds, Context 0..59, 16-bit TIFFs for Context-459 and ADE20K-847).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ..benchmarks import BENCHMARKS
from ..protocols import canonical_dataset

_VOC_PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 151) % 256)]


def _label_map(rng: np.random.Generator, size: tuple[int, int], num_raw: int, boundary: bool) -> np.ndarray:
    height, width = size
    label = np.full(size, rng.integers(0, num_raw), np.uint8 if num_raw <= 256 else np.uint16)
    for _ in range(4):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        h, w = rng.integers(4, height - y + 1), rng.integers(4, width - x + 1)
        label[y:y + h, x:x + w] = rng.integers(0, num_raw)
    if boundary:  # VOC's 255 outline between regions
        edges = (np.diff(label.astype(int), axis=0, prepend=label[:1]) != 0)
        label[edges] = 255
    return label


def _image(rng: np.random.Generator, label: np.ndarray) -> np.ndarray:
    colours = rng.integers(0, 256, (max(256, int(label.max()) + 1), 3))
    image = colours[label].astype(np.float64) + rng.normal(0, 12, (*label.shape, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _save_image(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rgb[:, :, ::-1])


def _save_label(path: Path, label: np.ndarray, palette: bool = False) -> None:
    """Single-channel PNG; a palette ('P') image for VOC, whose index Pillow returns as the label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        image = Image.frombytes("P", label.shape[::-1], np.ascontiguousarray(label).tobytes())
        image.putpalette(_VOC_PALETTE)
    else:
        image = Image.fromarray(label)
    image.save(path)


def write_dataset(name: str, root: str | Path, num_images: int = 3, size: tuple[int, int] = (48, 64),
                  seed: int = 0) -> Path:
    """Write ``num_images`` images and labels of ``name`` under ``root`` in its MMSeg layout; returns root."""
    name = canonical_dataset(name)
    root = Path(root)
    layout = BENCHMARKS[name]
    rng = np.random.default_rng(seed)
    ids = []
    for index in range(num_images):
        stem = {"cityscapes": f"synthcity/synthcity_{index:06d}_000019", "ade20k": f"ADE_val_{index + 1:08d}",
                "ade847": f"ADE_val_{index + 1:08d}", "coco_object": f"{index + 1:012d}",
                "coco_stuff": f"{index + 1:012d}", "coco_stuff10k": f"COCO_train2014_{index + 1:012d}",
                }.get(name, f"2008_{index:06d}")
        ids.append(stem)
        label = _label_map(rng, size, layout.raw_label_values, boundary=name in ("voc21", "voc20"))
        _save_image(root / layout.image_dir / f"{stem}{layout.image_suffix}", _image(rng, label))
        if name in ("coco_object", "coco_stuff"):
            # COCO-Stuff trainIds 0..79 are the things: COCO-Object = thing + 1, stuff and unlabelled → 0
            label[rng.random(size) < 0.02] = 255
            _save_label(root / layout.label_dir / f"{stem}_labelTrainIds.png", label)
            instance = np.where(label < 80, label + 1, 0).astype(np.uint8)
            _save_label(root / layout.label_dir / f"{stem}_instanceTrainIds.png", instance)
        else:
            _save_label(root / layout.label_dir / f"{stem}{layout.label_suffix}", label,
                        palette=name in ("voc21", "voc20"))
    if layout.split_file:
        split = root / layout.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("\n".join(ids) + "\n")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description="Write synthetic datasets in the MMSegmentation layouts.")
    parser.add_argument("--root", default="data/synthetic")
    parser.add_argument("--datasets", default="voc21,context60,coco_object,coco_stuff,cityscapes,ade20k")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    for index, name in enumerate(args.datasets.split(",")):
        write_dataset(name, args.root, args.images, (args.height, args.width), seed=index)
        print(f"wrote {args.images} {name} images under {args.root}")


if __name__ == "__main__":
    main()
