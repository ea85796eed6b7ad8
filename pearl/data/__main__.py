"""``python -m pearl.data``: check and prepare the benchmarks (docs/datasets.md).

    python -m pearl.data check [DATASET ...] [--root DIR] [--deep]
    python -m pearl.data prepare DATASET [--root DIR] [--workers N] [--download]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..benchmarks import ALL_DATASETS, BENCHMARKS, DATASETS, EXTRA_DATASETS
from .check import check
from .convert import CONVERTERS, PrepareError, conversion_jobs, convert_files, write_split
from .datasets import default_data_root
from .download import DownloadError, download


def _root(value: str | None) -> Path:
    return (Path(value) if value else default_data_root()).expanduser()


def _check(args) -> int:
    names = args.datasets or list(DATASETS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown dataset(s) {', '.join(unknown)}; valid: {', '.join(ALL_DATASETS)}", file=sys.stderr)
        return 2
    reports = [check(name, _root(args.root), deep=args.deep) for name in names]
    for report in reports:
        print(report.line(), flush=True)
    return 0 if all(r.ready for r in reports) else 1


def _convert(name: str, root: Path, workers: int, quiet: bool) -> None:
    converter = CONVERTERS[name]
    jobs = conversion_jobs(name, root)
    if not jobs:
        needs = converter.needs.replace("{label_dir}", BENCHMARKS[name].label_dir)
        raise PrepareError(f"no official files under {root}: {name} is built from {needs}; place them as "
                           f"docs/datasets.md ('Checking and preparing') says, or add --download where it can")
    written = convert_files(jobs, workers, progress=not quiet)
    print(f"{name}: {written} converted, {len(jobs) - written} already there", flush=True)
    if converter.split_file:
        print(f"{name}: wrote {write_split(name, root, jobs)} ({len(jobs)} ids)", flush=True)


def _prepare(args) -> int:
    name, root = args.dataset, _root(args.root)
    if name not in BENCHMARKS:
        print(f"error: unknown dataset {name!r}; valid: {', '.join(ALL_DATASETS)}", file=sys.stderr)
        return 2
    try:
        if args.download:
            for line in download(name, root, progress=not args.quiet):
                print(line, flush=True)
        if name in CONVERTERS:
            _convert(name, root, args.workers, args.quiet)
        else:
            print(f"{name}: ships in its evaluated form; nothing to convert", flush=True)
    except (DownloadError, PrepareError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = check(name, root)
    print(report.line(), flush=True)
    return 0 if report.ready else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pearl.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    checking = commands.add_parser("check", help="is each benchmark complete and right? (exit 1 if not)")
    checking.add_argument("datasets", nargs="*", help=f"default: the paper's eight ({', '.join(DATASETS)}); "
                                                     f"also {', '.join(EXTRA_DATASETS)}")
    checking.add_argument("--root", help="data_root (default $PEARL_DATA, else ./data)")
    checking.add_argument("--deep", action="store_true", help="decode every file, not a sample")
    preparing = commands.add_parser("prepare", help="build the evaluated labels from the official ones")
    preparing.add_argument("dataset", help=", ".join(ALL_DATASETS))
    preparing.add_argument("--root", help="data_root (default $PEARL_DATA, else ./data)")
    preparing.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
    preparing.add_argument("--quiet", action="store_true", help="no progress bar")
    preparing.add_argument("--download", action="store_true",
                           help="fetch the official archives first (resumable, digest-checked)")
    args = parser.parse_args(argv)
    return _check(args) if args.command == "check" else _prepare(args)


if __name__ == "__main__":
    sys.exit(main())
