"""Figures of the tables: ours against the paper, the PA × TLP ablation, Fig. 4 (TLP grid).

``python -m pearl.tables`` draws them into ``figures/`` beside its tables (docs/records.md, "Figures").
Everything here is drawn from the tables' own frames (``pearl.tables``), so a figure shows exactly
the cells, records and flags of the table it comes from. Each PNG carries its title as the
``Title`` text chunk; a title says when the figure holds smoke figures of a random-weight model,
or cells from partial splits or older code.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .benchmarks import BENCHMARKS, DATASETS, EXTRA_DATASETS

AVERAGE = "Avg"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def caveats(model: str, flags: list[str]) -> str:
    """What the title must say about where the numbers come from ('' when nothing)."""
    notes = []
    if "tiny" in model:  # the random smoke model's label is tiny:seed<N>; "… incl. tiny" for mixed figures
        notes.append("random weights: smoke figure, not a result")
    joined = ",".join(flags)
    if "partial" in joined:
        notes.append("includes partial-split runs")
    if "stale" in joined:
        notes.append("includes runs of older code")
    return " — " + "; ".join(notes) if notes else ""


def columns_of(table: pd.DataFrame) -> list[str]:
    """The table's dataset column titles in order (the eight, the average, the extra sets present)."""
    titles = [BENCHMARKS[d].title for d in DATASETS] + [AVERAGE] + [BENCHMARKS[d].title for d in EXTRA_DATASETS]
    return [title for title in titles if f"{title}_ours" in table.columns]


def bar_data(table: pd.DataFrame) -> pd.DataFrame:
    """[row, column, ours, paper, diff] for every row and dataset column of a table (NaN = no value)."""
    out = [{"row": line["row"], "column": column, "ours": line[f"{column}_ours"], "paper": line[f"{column}_paper"],
            "diff": line[f"{column}_diff"]}
           for _, line in table.iterrows() for column in columns_of(table)]
    return pd.DataFrame(out, columns=["row", "column", "ours", "paper", "diff"]).astype(
        {"ours": float, "paper": float, "diff": float})


def _flags(table: pd.DataFrame) -> list[str]:
    return [str(v) for c in table.columns if c.endswith("_flags") for v in table[c] if isinstance(v, str) and v]


def _save(fig, out: Path, title: str) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, metadata={"Title": title})
    _pyplot().close(fig)
    return out


def comparison_bars(table: pd.DataFrame, name: str, model: str, out: Path, metric: str = "mIoU") -> Path:
    """One panel per row: per dataset, our bar beside the paper's, the difference written above."""
    plt = _pyplot()
    data = bar_data(table)
    columns = columns_of(table)
    rows = list(dict.fromkeys(data["row"]))
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6.0, 0.75 * len(columns)), 1.9 * len(rows) + 0.6),
                             squeeze=False)
    positions = np.arange(len(columns))
    for ax, row in zip(axes[:, 0], rows):
        cells = data[data.row == row].set_index("column").reindex(columns)
        ax.bar(positions - 0.2, cells["ours"].fillna(0), 0.4, label="ours", color="tab:blue")
        ax.bar(positions + 0.2, cells["paper"].fillna(0), 0.4, label="paper", color="tab:gray")
        for x, (ours, diff) in enumerate(zip(cells["ours"], cells["diff"])):
            if pd.notna(diff):
                ax.annotate(f"{diff:+.1f}", (x - 0.2, ours), ha="center", va="bottom", fontsize=6)
            elif pd.isna(ours):
                ax.annotate("no run", (x - 0.2, 0), ha="center", va="bottom", fontsize=5, color="tab:red")
        ax.set_title(row, fontsize=8, loc="left")
        ax.set_xticks(positions, columns, fontsize=7)
        ax.set_ylabel(metric, fontsize=7)
        ax.tick_params(axis="y", labelsize=6)
    axes[0, 0].legend(fontsize=6, loc="upper right")
    title = f"{name}: ours vs paper ({model}){caveats(model, _flags(table))}"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save(fig, out, title)


def ablation_cells(table: pd.DataFrame) -> dict[tuple[bool, bool], str]:
    """(pa, tlp) → the ablation row that fills that cell of the 2×2: the first row with those switches
    (Table 3's order: vanilla CLIP, PA only, TLP only in the reduced block, PA + TLP)."""
    cells: dict[tuple[bool, bool], str] = {}
    for _, line in table.iterrows():
        cells.setdefault((bool(line["pa"]), bool(line["tlp"])), line["row"])
    return cells


def ablation_heatmap(table: pd.DataFrame, model: str, out: Path) -> Path:
    """Per dataset column, a 2×2 heat map of mIoU over PA (rows) × TLP (columns), ours with the paper's value."""
    plt = _pyplot()
    cells = ablation_cells(table)
    rows = table.set_index("row")
    columns = columns_of(table)
    fig, axes = plt.subplots(1, len(columns), figsize=(1.55 * len(columns), 2.1), squeeze=False)
    for ax, column in zip(axes[0], columns):
        ours = np.full((2, 2), np.nan)
        text = [["", ""], ["", ""]]
        for (pa, tlp), row in cells.items():
            value, paper = rows.loc[row, f"{column}_ours"], rows.loc[row, f"{column}_paper"]
            ours[int(pa), int(tlp)] = value
            text[int(pa)][int(tlp)] = ("·" if pd.isna(value) else f"{value:.1f}") + \
                ("" if pd.isna(paper) else f"\n({paper:.1f})")
        ax.imshow(np.ma.masked_invalid(ours), cmap="viridis")
        for i in range(2):
            for j in range(2):
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=6,
                        color="white" if np.isfinite(ours[i, j]) else "black")  # no run: on the white ground
        ax.set_xticks([0, 1], ["no TLP", "TLP"], fontsize=6)
        ax.set_yticks([0, 1], ["no PA", "PA"], fontsize=6)
        ax.set_title(column, fontsize=7)
    title = f"PA × TLP ablation, mIoU: ours (paper) ({model}){caveats(model, _flags(table))}"
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    return _save(fig, out, title)


def grid_figure(points: pd.DataFrame, model: str, out: Path, flags: list[str] = ()) -> Path:
    """mIoU against tlp_grid, one line per dataset (PEARL's Fig. 4); ``points`` [dataset, tlp_grid, mIoU]."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for dataset, group in points.groupby("dataset"):
        ax.plot(group["tlp_grid"], group["mIoU"], marker="o", label=BENCHMARKS[dataset].title)
    ax.set_xlabel("TLP grid size")
    ax.set_ylabel("mIoU (%)")
    title = f"PEARL ({model}): TLP grid size (cf. paper Fig. 4){caveats(model, list(flags))}"
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, title)
