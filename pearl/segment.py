"""Segment any image with any method: ``python -m pearl.segment IMAGE_OR_FOLDER ... --classes "cat; sky, cloud"``.

For each image it writes into ``--out``: ``<stem>_overlay.png`` (the image blended with the label
colours, a legend of the classes present), ``<stem>_labels.png`` (the label map as an indexed PNG whose
palette is the overlay's colours) and, with ``--save-probs``, ``<stem>_probs.npy`` (float16 [C, H, W]).
Every Segmentor parameter is an option of the same name (``--tlp_grid 40``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, PngImagePlugin
from tqdm import tqdm

from .data.datasets import FolderDataset, read_image
from .errors import UserError
from .params import PARAMS
from .protocols import DATASETS, class_names, parse_class_lines

IMAGE_SUFFIXES = FolderDataset.IMAGE_SUFFIXES
ALPHA = 0.5  # weight of the label colours in the overlay


def palette(num_classes: int) -> np.ndarray:
    """[C, 3] uint8 colours, distinct per class index (the PASCAL VOC bit-interleaving rule)."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
            shift -= 1
    return colours


def present_classes(labels: np.ndarray, classes: list[str]) -> list[tuple[int, str]]:
    """(index, class line) of every class that labels at least one pixel, in class order."""
    return [(int(index), classes[int(index)]) for index in np.unique(labels)]


def overlay(image: np.ndarray, labels: np.ndarray, classes: list[str]) -> Image.Image:
    """The image blended with the label colours and a legend of the classes present (top left)."""
    colours = palette(len(classes))
    blended = ((1 - ALPHA) * image + ALPHA * colours[labels]).astype(np.uint8)
    picture = Image.fromarray(blended)
    draw = ImageDraw.Draw(picture)
    entries = present_classes(labels, classes)
    row = 12
    width = min(picture.width, 16 + 7 * max(len(name.split(", ")[0]) for _, name in entries))
    draw.rectangle((0, 0, width, row * len(entries) + 4), fill=(0, 0, 0))
    for line, (index, name) in enumerate(entries):
        top = 2 + line * row
        draw.rectangle((2, top, 11, top + 9), fill=tuple(int(c) for c in colours[index]), outline=(255, 255, 255))
        draw.text((14, top - 1), name.split(", ")[0], fill=(255, 255, 255))
    return picture


def _png_info(entries: list[tuple[int, str]]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("legend", "\n".join(f"{index}: {name}" for index, name in entries))
    return info


def write_outputs(out_dir: Path, stem: str, image: np.ndarray, labels: np.ndarray, classes: list[str],
                  probs: np.ndarray | None = None) -> list[Path]:
    """The overlay, the indexed label PNG and (given ``probs``) the float16 probabilities of one image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = present_classes(labels, classes)
    paths = [out_dir / f"{stem}_overlay.png", out_dir / f"{stem}_labels.png"]
    overlay(image, labels, classes).save(paths[0], pnginfo=_png_info(entries))
    indexed = Image.fromarray(labels.astype(np.uint8), mode="P")
    indexed.putpalette(palette(len(classes)).ravel().tolist())
    indexed.save(paths[1], pnginfo=_png_info(entries))
    if probs is not None:
        paths.append(out_dir / f"{stem}_probs.npy")
        np.save(paths[2], probs.astype(np.float16))
    return paths


def _classes(args) -> list[str]:
    given = [args.classes is not None, args.classes_file is not None, args.dataset is not None]
    if sum(given) != 1:
        raise UserError("give the classes once: --classes \"cat; sky, cloud\", --classes-file FILE or --dataset NAME")
    if args.classes is not None:
        lines = [line.strip() for line in args.classes.split(";") if line.strip()]
    elif args.classes_file is not None:
        path = Path(args.classes_file)
        if not path.is_file():
            raise UserError(f"class file {path} does not exist")
        lines = parse_class_lines(path.read_text(encoding="utf-8"))
    else:
        if args.dataset not in DATASETS:
            raise UserError(f"--dataset {args.dataset!r} is not a benchmark; valid: {', '.join(DATASETS)}")
        lines = class_names(args.dataset, args.method)
    if not lines:
        raise UserError("the class list is empty; give at least one class")
    if len(lines) > 256:
        raise UserError(f"{len(lines)} classes do not fit an indexed PNG (at most 256)")
    return lines


def _images(paths: list[str]) -> list[Path]:
    found = []
    for given in map(Path, paths):
        if given.is_dir():
            found += sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif given.is_file():
            found.append(given)
        else:
            raise UserError(f"image or folder {given} does not exist")
    if not found:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(paths)}")
    return found


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pearl.segment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--classes", help='class lines separated by ";", synonyms by ", " ("cat, kitten; sky")')
    parser.add_argument("--classes-file", help="a class file, one class per line")
    parser.add_argument("--dataset", help=f"a benchmark's class list ({', '.join(DATASETS)})")
    parser.add_argument("--method", default="pearl", help="vanilla, sclip, naclip, clearclip, sfp or pearl")
    parser.add_argument("--pa", action=argparse.BooleanOptionalAction, default=None, help="PA (default: method's)")
    parser.add_argument("--tlp", action=argparse.BooleanOptionalAction, default=None, help="TLP (default: method's)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name, or tiny (random, offline)")
    parser.add_argument("--pretrained", default="openai", help="open_clip tag or checkpoint file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16")
    parser.add_argument("--out", default="segmented", help="output folder (default ./segmented)")
    parser.add_argument("--save-probs", action="store_true", help="also write <stem>_probs.npy (float16)")
    group = parser.add_argument_group("Segmentor parameters (default: the method's own)")
    for name, spec in PARAMS.items():
        group.add_argument(f"--{name}", type=yaml.safe_load, default=None, metavar="VALUE",
                           help=f"{spec.meaning} (default {spec.default!r})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        classes = _classes(args)
        images = _images(args.images)
        params = {name: getattr(args, name) for name in PARAMS if getattr(args, name) is not None}
        from .backbone import load_clip, tiny_clip
        from .segmentor import Segmentor
        if args.model == "tiny":
            model, tokenizer = tiny_clip()
        else:
            model, tokenizer = load_clip(args.model, args.pretrained, args.device, args.precision)
        seg = Segmentor(model, classes, method=args.method, pa=args.pa, tlp=args.tlp, tokenizer=tokenizer,
                        device=args.device, precision=args.precision, **params)
        out_dir = Path(args.out)
        for path in tqdm(images, desc="segmenting", unit="img", disable=len(images) == 1):
            image = read_image(path)
            result = seg.predict(image)
            probs = result.probs.numpy() if args.save_probs else None
            write_outputs(out_dir, path.stem, image, result.labels.numpy(), classes, probs)
        print(f"{len(images)} image(s) segmented with {args.method} → {out_dir}", flush=True)
        return 0
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
