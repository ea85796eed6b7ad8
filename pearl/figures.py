"""Figures from result records: PEARL's Fig. 4 (mIoU against the TLP grid size).

    python -m pearl.figures [--results results]      → results/fig4_tlp_grid.png (+ .csv)

Reads only records. The points are PEARL runs (PA and TLP on, own protocol) that differ from the
protocol in ``tlp_grid`` alone (or not at all: the protocol's grid, 80; Cityscapes 224).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from .benchmarks import DATASETS
from .records import DEFAULT_MODEL, RunRecord, load_records
from .tables import COLUMN_TITLES, Selection, pivot, recipe_arguments


def grid_points(records: list[RunRecord], selection: Selection | None = None) -> pd.DataFrame:
    """[dataset, tlp_grid, mIoU] of PEARL runs (PA and TLP on, own protocol) that differ from the
    protocol in ``tlp_grid`` alone, selected as the tables select (model, full split, current code)."""
    table = pivot(records, "tlp_grid", selection, method="pearl")
    table = table[table.pa & table.tlp & (table.profile == "own")] if not table.empty else table
    rows = [{"dataset": dataset, "tlp_grid": line["tlp_grid"], "mIoU": line[COLUMN_TITLES[dataset]]}
            for _, line in table.iterrows() for dataset in DATASETS if pd.notna(line[COLUMN_TITLES[dataset]])]
    frame = pd.DataFrame(rows, columns=["dataset", "tlp_grid", "mIoU"])
    return frame.sort_values(["dataset", "tlp_grid"]).reset_index(drop=True)


def grid_figure(records: list[RunRecord], out: str | Path, selection: Selection | None = None) -> Path | None:
    """Plot mIoU against tlp_grid, one line per dataset; None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    selection = selection or Selection()
    points = grid_points(records, selection)
    if points.empty:
        return None
    out = Path(out)
    points.to_csv(out.with_suffix(".csv"), index=False)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dataset, group in points.groupby("dataset"):
        ax.plot(group["tlp_grid"], group["mIoU"], marker="o", label=COLUMN_TITLES.get(dataset, dataset))
    ax.set_xlabel("TLP grid size")
    ax.set_ylabel("mIoU (%)")
    smoke = " — random weights: smoke figure" if selection.model.startswith("tiny") else ""
    ax.set_title(f"PEARL ({selection.model}): TLP grid size (cf. paper Fig. 4){smoke}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw figures from result records. Extra key=value arguments are "
                                                 "read as run.py overrides (results_dir=, model=…), as in the tables.")
    parser.add_argument("--results", default=None, help="folder holding runs/*.json (default: results)")
    parser.add_argument("--model", default=None, help=f"model label NAME:TAG (default {DEFAULT_MODEL})")
    parser.add_argument("--include-partial", action="store_true", help="let partial runs count (smoke runs)")
    args, rest = parser.parse_known_args(argv)
    results_dir, recipe_model = recipe_arguments(rest)
    results = Path(args.results or results_dir or "results")
    selection = Selection(args.model or recipe_model or DEFAULT_MODEL, include_partial=args.include_partial)
    path = grid_figure(load_records(results), results / "fig4_tlp_grid.png", selection)
    print(f"wrote {path}" if path else "no PEARL runs with a tlp_grid sweep: run experiments/tlp_grid.sh first")


if __name__ == "__main__":
    main()
