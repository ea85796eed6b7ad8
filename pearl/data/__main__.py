"""``python -m pearl.data``: check and prepare the benchmarks (docs/datasets.md).

    python -m pearl.data check [DATASET ...] [--root DIR] [--deep]
    python -m pearl.data prepare DATASET [--root DIR] [--workers N] [--download]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..benchmarks import BENCHMARKS, DATASETS
from .check import check
from .convert import RULES, conversion_jobs, convert_files
from .datasets import default_data_root
from .download import DownloadError, download

AS_SHIPPED = ("voc21", "voc20", "ade20k")
NOT_YET = {name: "build VOCdevkit/VOC2010/SegmentationClassContext and ImageSets/SegmentationContext/val.txt with "
                 "MMSegmentation's tools/dataset_converters/pascal_context.py (a converter of ours is not there yet)"
           for name in ("context60", "context59")}


def _root(value: str | None) -> Path:
    return (Path(value) if value else default_data_root()).expanduser()


def _check(args) -> int:
    names = args.datasets or list(DATASETS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown dataset(s) {', '.join(unknown)}; valid: {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    reports = [check(name, _root(args.root), deep=args.deep) for name in names]
    for report in reports:
        print(report.line(), flush=True)
    return 0 if all(r.ready for r in reports) else 1


def _prepare(args) -> int:
    name, root = args.dataset, _root(args.root)
    if name not in BENCHMARKS:
        print(f"error: unknown dataset {name!r}; valid: {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    if args.download:
        try:
            for line in download(name, root, progress=not args.quiet):
                print(line, flush=True)
        except DownloadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if name in NOT_YET:
        print(f"error: prepare {name}: {NOT_YET[name]}", file=sys.stderr)
        return 2
    if name in RULES:
        label_dir = root / BENCHMARKS[name].label_dir
        source_suffix = RULES[name][1]
        jobs = conversion_jobs(name, label_dir)
        if not jobs:
            print(f"error: no official label files (*{source_suffix}) under {label_dir}; place them as "
                  f"MMSegmentation's dataset guide does (docs/datasets.md, 'Preparing')", file=sys.stderr)
            return 2
        written = convert_files(jobs, args.workers, progress=not args.quiet)
        print(f"{name}: {written} converted, {len(jobs) - written} already there", flush=True)
    else:
        print(f"{name}: ships in its evaluated form; nothing to convert", flush=True)
    report = check(name, root)
    print(report.line(), flush=True)
    return 0 if report.ready else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pearl.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="is each benchmark complete and right? (exit 1 if not)")
    checking.add_argument("datasets", nargs="*", help=f"default: all ({', '.join(DATASETS)})")
    checking.add_argument("--root", help="data_root (default $PEARL_DATA, else ./data)")
    checking.add_argument("--deep", action="store_true", help="decode every file, not a sample")
    preparing = commands.add_parser("prepare", help="build the evaluated labels from the official ones")
    preparing.add_argument("dataset", help=", ".join(DATASETS))
    preparing.add_argument("--root", help="data_root (default $PEARL_DATA, else ./data)")
    preparing.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    preparing.add_argument("--quiet", action="store_true", help="no progress bar")
    preparing.add_argument("--download", action="store_true",
                           help="fetch the official archives first (resumable, digest-checked)")
    args = parser.parse_args(argv)
    return _check(args) if args.command == "check" else _prepare(args)


if __name__ == "__main__":
    sys.exit(main())
