"""Result records + the paper's numbers → the paper's tables as CSV and Markdown.

    python -m pearl.tables [--results results] [--paper results/paper]     (or: pearl-tables)

Writes ``main.csv`` (Table 1), ``ablation.csv`` (Table 3), ``plug_and_play.csv`` (Table 4),
``resolution.csv`` (Table 5) and their pAcc twins (``*_pacc.csv``), each also as ``.md``. Every cell carries ours, the paper's number
and the difference; a missing run is an empty cell; averages only over complete rows.
Reads only records (``pearl.records``) and the paper CSVs.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .protocols import DATASETS
from .records import load_records

COLUMN_TITLES = {"voc21": "VOC21", "context60": "PC60", "coco_object": "Object", "voc20": "VOC20",
                 "context59": "PC59", "coco_stuff": "Stuff", "cityscapes": "City", "ade20k": "ADE"}


@dataclass(frozen=True)
class Row:
    """One table row: which records fill it and which paper row sits beside it."""

    title: str
    method: str
    pa: bool
    tlp: bool
    paper_table: str | None
    paper_row: str | None
    overrides: dict = field(default_factory=dict)
    profile: str = "own"
    pacc_row: str | None = None  # the row of the paper's pAcc table (Table 2) beside this one


MAIN = [Row("CLIP", "vanilla", False, False, "table1", "CLIP"),
        Row("SCLIP", "sclip", False, False, "table1", "SCLIP"),
        Row("NACLIP (no PAMR)", "naclip", False, False, "table1", "NACLIP"),
        Row("ClearCLIP", "clearclip", False, False, "table1", "ClearCLIP"),
        Row("SFP", "sfp", False, False, "table1", "SFP"),
        Row("PEARL", "pearl", True, True, "table1", "PEARL (Ours)", pacc_row="PEARL (Ours)")]
ABLATION = [Row("Vanilla CLIP (full block)", "vanilla", False, False, "table3", "Vanilla CLIP (no PA, no TLP)"),
            Row("PA only", "pearl", True, False, "table3", "PA only"),
            Row("TLP only (reduced block)", "pearl", False, True, "table3", "TLP only"),
            Row("TLP only (full block)", "pearl", False, True, "table3", "TLP only", {"arch": "vanilla"}),
            Row("PA + TLP (PEARL)", "pearl", True, True, "table3", "PA + TLP (PEARL)", pacc_row="PEARL (Ours)")]
PLUG_AND_PLAY = [Row(f"{title} {tag}", method, False, tlp, "table4" if paper else None,
                     f"{title} {tag}" if paper else None)
                 for title, method, paper in (("SCLIP", "sclip", True), ("NACLIP", "naclip", True),
                                              ("SFP", "sfp", True), ("ClearCLIP", "clearclip", False),
                                              ("CLIP", "vanilla", False))
                 for tag, tlp in (("without TLP", False), ("with TLP", True))]
RESOLUTION = [Row(f"short side {side}", "pearl", True, True, "table5", f"short side {side}", {"resize_short": side})
              for side in (224, 280, 336)]
TABLES = {"main": MAIN, "ablation": ABLATION, "plug_and_play": PLUG_AND_PLAY, "resolution": RESOLUTION}


def default_paper_dir() -> Path:
    beside_package = Path(__file__).resolve().parents[1] / "results" / "paper"
    return beside_package if beside_package.is_dir() else Path("results/paper")


def load_paper(paper_dir: str | Path) -> pd.DataFrame:
    frames = [pd.read_csv(path, dtype={"value": "float64"}, keep_default_na=False, na_values=[""])
              for path in sorted(Path(paper_dir).glob("*.csv"))]
    if not frames:
        raise FileNotFoundError(f"no paper-number CSVs in {paper_dir}; pass --paper results/paper")
    return pd.concat(frames, ignore_index=True)


def _matches(record: dict, row: Row) -> bool:
    return (record.get("method") == row.method and record.get("pa") == row.pa and record.get("tlp") == row.tlp
            and record.get("profile", "own") == row.profile and (record.get("overrides") or {}) == row.overrides)


def _ours(records: list[dict], row: Row, dataset: str, metric: str) -> tuple[float | None, str | None]:
    """(value, model) of the newest record filling this cell, or (None, None)."""
    found = [r for r in records if r.get("dataset") == dataset and _matches(r, row) and r.get(metric) is not None]
    if not found:
        return None, None
    newest = max(found, key=lambda r: r.get("finished_at", ""))
    model = newest.get("model", {})
    return newest[metric], f"{model.get('name')}:{model.get('pretrained')}"


def _paper(paper: pd.DataFrame, row: Row, dataset: str, table_suffix: str) -> tuple[float | None, str]:
    table, paper_row = ("table2", row.pacc_row) if table_suffix == "pacc" else (row.paper_table, row.paper_row)
    if table is None or paper_row is None:
        return None, "—"
    hit = paper[(paper.table == table) & (paper.row == paper_row) & (paper.dataset == dataset)]
    if hit.empty:
        return None, "—"
    value = hit.iloc[0]["value"]
    return (None if pd.isna(value) else float(value)), str(hit.iloc[0]["status"])


def build_table(records: list[dict], paper: pd.DataFrame, rows: list[Row], metric: str = "mIoU") -> pd.DataFrame:
    """Wide table: per dataset ours / paper / diff, then the averages and completeness."""
    suffix = "pacc" if metric == "aAcc" else "miou"
    out = []
    for row in rows:
        line = {"row": row.title, "method": row.method, "pa": row.pa, "tlp": row.tlp,
                "overrides": ";".join(f"{k}={v}" for k, v in row.overrides.items())}
        values, models = [], set()
        for dataset in DATASETS:
            ours, model = _ours(records, row, dataset, metric)
            paper_value, status = _paper(paper, row, dataset, suffix)
            title = COLUMN_TITLES[dataset]
            line[f"{title}_ours"] = None if ours is None else round(ours, 2)
            line[f"{title}_paper"] = paper_value
            line[f"{title}_paper_status"] = status
            line[f"{title}_diff"] = None if ours is None or paper_value is None else round(ours - paper_value, 2)
            values.append(ours)
            if model:
                models.add(model)
        missing = [COLUMN_TITLES[d] for d, v in zip(DATASETS, values) if v is None]
        complete = not missing
        avg = sum(values) / len(values) if complete else None
        avg_rounded = sum(round(v, 2) for v in values) / len(values) if complete else None
        paper_avg, paper_status = _paper(paper, row, "avg_printed", suffix)
        line.update({"Avg_ours": None if avg is None else round(avg, 2),
                     "Avg_ours_of_rounded": None if avg_rounded is None else round(avg_rounded, 2),
                     "Avg_paper": paper_avg, "Avg_paper_status": paper_status,
                     "Avg_diff": None if avg is None or paper_avg is None else round(avg - paper_avg, 2),
                     "complete": complete, "missing": ",".join(missing), "model": ",".join(sorted(models))})
        out.append(line)
    return pd.DataFrame(out)


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def to_markdown(table: pd.DataFrame) -> str:
    """Cells as 'ours / paper (diff)'; empty where unknown."""
    titles = [COLUMN_TITLES[d] for d in DATASETS] + ["Avg"]
    lines = ["| row | " + " | ".join(titles) + " | missing | model |", "|---" * (len(titles) + 3) + "|"]
    for _, r in table.iterrows():
        cells = []
        for title in titles:
            ours, paper, diff = r[f"{title}_ours"], r[f"{title}_paper"], r[f"{title}_diff"]
            text = f"{_fmt(ours) or '·'} / {_fmt(paper) or '·'}"
            if _fmt(diff):
                text += f" ({diff:+.2f})"
            cells.append(text)
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {r['missing']} | {r['model']} |")
    lines.append("")
    lines.append("Cells: ours / paper (ours − paper); '·' = no run or no known paper value. Avg only over "
                 "complete rows (all eight datasets).")
    return "\n".join(lines) + "\n"


def write_tables(results_dir: str | Path = "results", paper_dir: str | Path | None = None,
                 out_dir: str | Path | None = None) -> tuple[dict[str, Path], int]:
    """Write every table; returns the CSV paths by table name and the number of records read."""
    records = load_records(results_dir)
    paper = load_paper(paper_dir or default_paper_dir())
    out_dir = Path(out_dir or results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, rows in TABLES.items():
        for metric, suffix in (("mIoU", ""), ("aAcc", "_pacc")):
            table = build_table(records, paper, rows, metric)
            csv_path = out_dir / f"{name}{suffix}.csv"
            table.to_csv(csv_path, index=False)
            (out_dir / f"{name}{suffix}.md").write_text(to_markdown(table))
            written[f"{name}{suffix}"] = csv_path
    return written, len(records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the paper's tables from result records.")
    parser.add_argument("--results", default="results", help="folder holding runs/*.json (default: results)")
    parser.add_argument("--paper", default=None, help="folder of the paper CSVs (default: results/paper)")
    parser.add_argument("--out", default=None, help="output folder (default: the results folder)")
    args = parser.parse_args(argv)
    written, count = write_tables(args.results, args.paper, args.out)
    print(f"{count} records → " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    main()
