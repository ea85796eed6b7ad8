"""Segment any image with any method: ``python -m pearl.segment IMAGE_OR_FOLDER ... --classes "cat; sky, cloud"``.

For each image it writes into ``--out``: ``<stem>_overlay.png`` (the image blended with the label
colours, a legend of the classes present), ``<stem>_labels.png`` (the label map as an indexed PNG
whose palette is the overlay's colours; a 16-bit grey PNG above 256 classes) and, with
``--save-probs``, ``<stem>_probs.npy`` (float16 [C, H, W]).
Every Segmentor parameter is an option of the same name (``--tlp_grid 40``).

``--compare vanilla,naclip,pearl:tlp=false`` instead writes ``<stem>_compare.png``: the input, the
ground truth when ``--masks DIR`` is given, and one titled overlay per method variant, with one
legend of the classes shown; ``--grid`` puts all images as rows of one ``compare_grid.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from .benchmarks import ALL_DATASETS
from .data.datasets import FolderDataset, read_image, read_label
from .errors import UserError
from .params import PARAMS
from .protocols import class_names, parse_class_lines
from .records import path_component
from .render import comparison_figure, comparison_row, save_figure, smoke_note, write_outputs

IMAGE_SUFFIXES = FolderDataset.IMAGE_SUFFIXES


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
        if args.dataset not in ALL_DATASETS:
            raise UserError(f"--dataset {args.dataset!r} is not a benchmark; valid: {', '.join(ALL_DATASETS)}")
        lines = class_names(args.dataset, args.method)
    if not lines:
        raise UserError("the class list is empty; give at least one class")
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
    parser.add_argument("--dataset", help=f"a benchmark's class list ({', '.join(ALL_DATASETS)})")
    parser.add_argument("--method", default="pearl", help="vanilla, sclip, naclip, clearclip, sfp or pearl")
    parser.add_argument("--pa", action=argparse.BooleanOptionalAction, default=None, help="PA (default: method's)")
    parser.add_argument("--tlp", action=argparse.BooleanOptionalAction, default=None, help="TLP (default: method's)")
    add_model_options(parser)
    parser.add_argument("--vfm", default=None, help="second vision model of a method that reads one "
                        "(proxyclip): dino_b8, dino_b16, dinov2_b14_reg, dinov3_b16, tiny (default: the method's; "
                        "tiny with --model tiny)")
    parser.add_argument("--vfm-pretrained", default="hub", help="its weights: hub (the Hugging Face cache), "
                        "a checkpoint file, or none (random)")
    parser.add_argument("--out", default="segmented", help="output folder (default ./segmented)")
    parser.add_argument("--save-probs", action="store_true", help="also write <stem>_probs.npy (float16)")
    parser.add_argument("--compare", metavar="VARIANTS",
                        help="methods side by side, e.g. vanilla,naclip,pearl:tlp=false (options after ':' are "
                             "pa, tlp or any parameter): writes <stem>_compare.png per image")
    parser.add_argument("--masks", help="folder of ground-truth label PNGs <stem><mask-suffix>, shown in --compare")
    parser.add_argument("--mask-suffix", default=".png", help="ground-truth file suffix (default .png)")
    parser.add_argument("--grid", action="store_true", help="with --compare: all images as rows of one "
                                                            "compare_grid.png")
    group = parser.add_argument_group("Segmentor parameters (default: the method's own)")
    for name, spec in PARAMS.items():
        group.add_argument(f"--{name}", type=yaml.safe_load, default=None, metavar="VALUE",
                           help=f"{spec.meaning} (default {spec.default!r})")
    return parser


def parse_variants(text: str, params: dict, option: str = "--compare") -> list[tuple[str, str, dict]]:
    """(title, method, settings) of each entry of ``option``: ``method[:name=value...]``, comma-separated."""
    variants = []
    for entry in (part.strip() for part in text.split(",")):
        method, *options = entry.split(":")
        settings = dict(params)
        for option in options:
            name, sep, value = option.partition("=")
            if not sep:
                raise UserError(f"{option} {entry!r}: options are name=value after the method, e.g. pearl:tlp=false")
            settings[name.strip()] = yaml.safe_load(value)
        variants.append((entry, method.strip(), settings))
    if not variants or not all(method for _, method, _ in variants):
        raise UserError(f"{option} needs at least one method, e.g. {option} vanilla,naclip,pearl")
    return variants


def output_names(paths: list[Path]) -> list[str]:
    """One output name per image: its stem; where stems repeat (``a.jpg`` and ``a.png``, or one file
    name in two folders), its path below the images' common folder, suffix included, as one name
    (``dir1_a_jpg``). A UserError when two images would still share a name."""
    stems = Counter(path.stem for path in paths)
    if len(stems) == len(paths):
        return [path.stem for path in paths]
    common = Path(os.path.commonpath([path.resolve().parent for path in paths]))
    names = [path.stem if stems[path.stem] == 1 else
             path_component("_".join(path.resolve().relative_to(common).parts)).replace(".", "_") for path in paths]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise UserError(f"several images would be written as {repeated[0]!r}; give each image its own file name")
    return names


def _ground_truth(args, path: Path, shape: tuple[int, int], num_classes: int) -> np.ndarray | None:
    if args.masks is None:
        return None
    mask = Path(args.masks) / f"{path.stem}{args.mask_suffix}"  # stems are unique when masks are given
    if not mask.is_file():
        raise UserError(f"ground truth {mask} for {path.name} does not exist (--masks, --mask-suffix)")
    ignored = 255 if num_classes <= 255 else 65535  # the label files' convention: 8-bit 255, 16-bit 65535
    labels = read_label(mask, num_classes, reduce_zero_label=False, ignore_index=ignored)  # checked as in evaluation
    if labels.shape != shape:
        raise UserError(f"ground truth {mask} is {labels.shape[1]}×{labels.shape[0]}, the image {shape[1]}×{shape[0]}")
    return labels


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --pretrained, --device, --precision (shared by pearl.segment and pearl.attention)."""
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name, or tiny (random, offline)")
    parser.add_argument("--pretrained", default="openai", help="open_clip tag or checkpoint file")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="fp32", help="fp32, fp16 or bf16")


def load_model(args):
    """(model, tokenizer) of --model / --pretrained on --device at --precision; ``tiny`` = the
    seeded random model (smoke pictures only)."""
    from .loading import load_clip, prepare_model, resolve_device, tiny_clip
    args.device = str(resolve_device(args.device))  # "auto" resolved; a device this machine lacks fails here
    if args.model == "tiny":
        model, tokenizer = tiny_clip()
        return prepare_model(model, args.device, args.precision), tokenizer
    return load_clip(args.model, args.pretrained, args.device, args.precision)


def _segmentor(args, model, tokenizer, classes, method: str, settings: dict):
    from .segmentor import Segmentor
    from .vfm import shared_vfm, vfm_for
    settings = dict(settings)
    pa, tlp = settings.pop("pa", args.pa), settings.pop("tlp", args.tlp)
    name = vfm_for(method, args.vfm, args.model)
    pretrained = None if args.vfm_pretrained == "none" else args.vfm_pretrained
    vision = shared_vfm(name, pretrained, args.device) if name else None
    return Segmentor(model, classes, method=method, pa=pa, tlp=tlp, tokenizer=tokenizer, device=args.device,
                     precision=args.precision, vfm=vision, **settings)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        classes = _classes(args)
        images = _images(args.images)
        names = output_names(images)
        stems = Counter(path.stem for path in images)
        if args.masks and len(stems) < len(images):
            raise UserError("--masks finds each image's mask by its stem, and some images share one "
                            f"({', '.join(p.name for p in images if stems[p.stem] > 1)}): "
                            "rename them, or segment them apart")
        params = {name: getattr(args, name) for name in PARAMS if getattr(args, name) is not None}
        variants = parse_variants(args.compare, params) if args.compare else [(args.method, args.method, params)]
        if (args.grid or args.masks) and not args.compare:
            raise UserError("--grid and --masks go with --compare")
        model, tokenizer = load_model(args)
        segs = [(title, _segmentor(args, model, tokenizer, classes, method, settings))
                for title, method, settings in variants]
        out_dir = Path(args.out)
        rows = []
        for path, name in tqdm(list(zip(images, names)), desc="segmenting", unit="img", disable=len(images) == 1):
            image = read_image(path)
            if not args.compare:
                result = segs[0][1].predict(image)
                probs = result.probs.numpy() if args.save_probs else None
                write_outputs(out_dir, name, image, result.labels.numpy(), classes, probs, smoke_note(args.model))
                continue
            row = comparison_row(image, [(title, seg.predict(image).labels.numpy()) for title, seg in segs], classes,
                                 _ground_truth(args, path, image.shape[:2], len(classes)))
            if args.grid:
                rows.append(row)
            else:
                save_figure(comparison_figure([row], classes, smoke_note(args.model)), out_dir / f"{name}_compare.png")
        if rows:
            save_figure(comparison_figure(rows, classes, smoke_note(args.model)), out_dir / "compare_grid.png")
        what = args.method if not args.compare else f"{len(segs)} variants"
        print(f"{len(images)} image(s) segmented with {what} → {out_dir}", flush=True)
        return 0
    except (UserError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
