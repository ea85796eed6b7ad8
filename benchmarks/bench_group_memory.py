"""Peak host memory of a shared-trunk group of N jobs on VOC-size images, with and without the
memory budget that splits a group (``group_memory_gib``; docs/speed.md §3).

    python benchmarks/bench_group_memory.py                  # N = 4, 16, 64; budget off and 4 GiB
    python benchmarks/bench_group_memory.py --jobs 4,16 --budgets 1,4

Each measurement runs in its own process (peak RSS, ``ru_maxrss``, is that run's alone): a sweep of
N PEARL jobs that differ only in ``tlp_grid`` (so each has its own refinement and prediction) over
a synthetic VOC21 folder of 500×375 images, evaluated together, records written. Tiny
random-weight model: the figures are about memory, no number here is a segmentation result.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

from child_process import measure_in_child

UNBOUNDED_GIB = 1e6  # a budget no group reaches: the old behaviour, every job of a group at once


def _measure(jobs: int, budget_gib: float, images: int) -> dict:
    import logging

    from hydra import compose, initialize_config_dir

    from pearl import cli, runner, sweep
    from pearl.config import register_config_groups
    from pearl.data.synthetic import write_dataset

    logging.getLogger("pearl").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp())
    data = write_dataset("voc21", work / "data", num_images=images, size=(375, 500))
    register_config_groups()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfgs = [compose("config", overrides=["model=tiny", f"data_root={data}", f"results_dir={work / 'res'}",
                                             "progress=false", "loader_workers=0", "method=pearl",
                                             f"tlp_grid={20 + index}", f"group_memory_gib={budget_gib}"])
                for index in range(jobs)]
    parts = []
    evaluate_together = runner.evaluate_together

    def counting(group_cfgs):
        for positions in evaluate_together(group_cfgs):
            parts.append(len(positions))
            yield positions
    sweep.evaluate_together = counting
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    outcomes = sweep.run_sweep(cfgs, lambda index: cli.execute(cfgs[index]))
    return {"jobs": jobs, "budget_gib": None if budget_gib >= UNBOUNDED_GIB else budget_gib,
            "parts": parts, "ran": outcomes.count("ran"),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "before_gib": before / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="4,16,64", help="group sizes (default 4,16,64)")
    parser.add_argument("--budgets", default="off,4", help="group_memory_gib values; off = unbounded")
    parser.add_argument("--images", type=int, default=2, help="VOC-size images in the folder (default 2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        jobs, budget = args.child.split(":")
        print(json.dumps(_measure(int(jobs), float(budget), args.images)))
        return
    print("PEARL jobs (tlp_grid differs) on one shared trunk, VOC21, 500×375 images, tiny random-weight model, CPU")
    for jobs in map(int, args.jobs.split(",")):
        for budget in args.budgets.split(","):
            gib = UNBOUNDED_GIB if budget == "off" else float(budget)
            r, failure = measure_in_child([sys.executable, __file__, "--images", str(args.images), "--child",
                                           f"{jobs}:{gib}"])
            if r is None:
                print(f"{jobs:3d} jobs, budget {budget}: {failure}")
                continue
            print(f"{jobs:3d} jobs  budget {budget:>4s} GiB  parts {r['parts']}  {r['ran']} records  "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB (before the sweep {r['before_gib']:.2f})", flush=True)


if __name__ == "__main__":
    main()
