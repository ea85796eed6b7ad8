"""Figures from result records: PEARL's Fig. 4 (mIoU against the TLP grid size).

    python -m pearl.figures [--results results]      → results/fig4_tlp_grid.png (+ .csv)

Reads only records. The points are PEARL runs (PA and TLP on, own protocol) whose only
command-line override is ``tlp_grid`` (or none: the protocol's grid, 80; Cityscapes 224).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from .records import load_records
from .tables import COLUMN_TITLES


def grid_points(records: list[dict]) -> pd.DataFrame:
    """[dataset, tlp_grid, mIoU] of the qualifying PEARL runs, newest record per point."""
    rows = [{"dataset": r["dataset"], "tlp_grid": r["params"]["tlp_grid"], "mIoU": r["mIoU"],
             "finished_at": r.get("finished_at", "")}
            for r in records
            if r.get("method") == "pearl" and r.get("pa") and r.get("tlp") and r.get("profile", "own") == "own"
            and set(r.get("overrides") or {}) <= {"tlp_grid"} and r.get("mIoU") is not None]
    frame = pd.DataFrame(rows, columns=["dataset", "tlp_grid", "mIoU", "finished_at"])
    frame = frame.sort_values("finished_at").drop_duplicates(["dataset", "tlp_grid"], keep="last")
    return frame.drop(columns="finished_at").sort_values(["dataset", "tlp_grid"]).reset_index(drop=True)


def grid_figure(records: list[dict], out: str | Path) -> Path | None:
    """Plot mIoU against tlp_grid, one line per dataset; None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = grid_points(records)
    if points.empty:
        return None
    out = Path(out)
    points.to_csv(out.with_suffix(".csv"), index=False)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dataset, group in points.groupby("dataset"):
        ax.plot(group["tlp_grid"], group["mIoU"], marker="o", label=COLUMN_TITLES.get(dataset, dataset))
    ax.set_xlabel("TLP grid size")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("PEARL: TLP grid size (cf. paper Fig. 4)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw figures from result records.")
    parser.add_argument("--results", default="results")
    args = parser.parse_args(argv)
    path = grid_figure(load_records(args.results), Path(args.results) / "fig4_tlp_grid.png")
    print(f"wrote {path}" if path else "no PEARL runs with a tlp_grid sweep: run experiments/tlp_grid.sh first")


if __name__ == "__main__":
    main()
