"""Result records + the paper's numbers → the paper's tables as CSV and Markdown.

    python -m pearl.tables [--results results] [--model NAME:TAG] [--pivot PARAM] [--no-figures]   (or: pearl-tables)

Writes ``main.csv`` (Table 1), ``ablation.csv`` (Table 3), ``plug_and_play.csv`` (Table 4),
``resolution.csv`` (Table 5), ``code_vs_paper.csv`` (PEARL with each of the paper's variants, with
each cell's difference to the released code) and their pAcc twins (``*_pacc.csv``), each also as
``.md``, per model, and ``backbones.csv`` (Table 6 and every method × model run) with its method × backbone
layout ``backbones_by_model.csv``. Every cell carries ours, the paper's number, the difference, the
record it came from and its flags; a cell is filled only by a record whose identity satisfies the
row (never by recency alone: see :class:`Row`); averages only over complete rows. The evaluation
sets beyond the paper (``EXTRA_DATASETS``) get columns after the average when the model has
records of them, with empty paper cells. Beside each model's tables, ``figures/`` holds their
figures (``pearl.figures``: ours vs paper per table, the PA × TLP heat map, Fig. 4). Reads only
records (``pearl.records``) and the paper CSVs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import figures
from .benchmarks import BENCHMARKS, DATASETS, EXTRA_DATASETS
from .params import PARAMS, code_vs_paper_runs
from .records import DEFAULT_MODEL, RunRecord, code_version, load_records, model_label, path_component
from .settings import comparable, deviations, job_settings

COLUMN_TITLES = {name: benchmark.title for name, benchmark in BENCHMARKS.items()}


@dataclass(frozen=True)
class Row:
    """One table row: the resolved settings a record needs to fill it, and the paper row beside it.

    A record fills the row's cell on a dataset only if its method, pa, tlp, profile and every
    resolved parameter equal ``job_settings(method, pa, tlp, dataset, profile, overrides)``, its
    model is the table's (or the row's own ``model``) and it evaluated the full official split.
    """

    title: str
    method: str
    pa: bool
    tlp: bool
    paper_table: str | None
    paper_row: str | None
    overrides: dict = field(default_factory=dict)
    profile: str = "own"
    pacc_row: str | None = None  # the row of the paper's pAcc table (Table 2) beside this one
    model: str | None = None     # a fixed model label (Table 6); None = the table's model
    vfm: str | None = None  # the second vision model its records ran with (ProxyCLIP, LPOSS, CASS); None = any


@dataclass(frozen=True)
class Selection:
    """Which records may fill a cell: the model, and whether partial or older-code runs may (marked)."""

    model: str = DEFAULT_MODEL
    include_partial: bool = False
    include_stale: bool = False
    code: str = field(default_factory=code_version)

    def admits(self, record: RunRecord) -> bool:
        """Whether ``record`` may fill a cell by how it was made: the full split (or partial runs
        admitted) and the current code (or older code admitted)."""
        return ((record.full_split or self.include_partial)
                and (record.code_version == self.code or self.include_stale))


@dataclass(frozen=True)
class Cell:
    record: RunRecord | None
    flags: tuple[str, ...] = ()  # 'stale' (older code), 'partial' (not the full split), 'of N' (N candidates)


LPOSS_MODEL = "ViT-B-16:laion2b_s34b_b88k"  # configs/maskclip.yaml of vladan-stojnic/LPOSS@e489a74
MAIN = [Row("CLIP", "vanilla", False, False, "table1", "CLIP"),
        Row("SCLIP", "sclip", False, False, "table1", "SCLIP"),
        Row("NACLIP (no PAMR)", "naclip", False, False, "table1", "NACLIP"),
        Row("MaskCLIP", "maskclip", False, False, "table1", "MaskCLIP"),
        Row("GEM", "gem", False, False, "table1", "GEM"),
        Row("ClearCLIP", "clearclip", False, False, "table1", "ClearCLIP"),
        Row("SFP", "sfp", False, False, "table1", "SFP"),
        # not in PEARL's Table 1: beside the numbers their own repositories publish
        Row("SC-CLIP", "scclip", False, False, "own_sources", "SC-CLIP README figure"),
        *[Row(f"{title} + ResCLIP", method, False, False, "own_sources", f"ResCLIP README {title}+ResCLIP",
              {"resclip": True}, profile="resclip") for title, method in (("SCLIP", "sclip"), ("NACLIP", "naclip"),
                                                                         ("ClearCLIP", "clearclip"))],
        # PEARL's Table 1 ran ProxyCLIP with DINOv2 ViT-B/14 with registers; its code defaults to DINO ViT-B/8
        Row("ProxyCLIP (DINOv2 B/14 reg.)", "proxyclip", False, False, "table1", "ProxyCLIP",
            vfm="dinov2_b14_reg"),
        Row("ProxyCLIP (DINO B/8, its code's default)", "proxyclip", False, False, None, None, vfm="dino_b8"),
        # LPOSS's code runs OpenCLIP's LAION-2B ViT-B/16 (+experiment=lposs); the numbers PEARL's Table 1
        # prints as "LPOSS" are its paper's LPOSS+ (docs/methods.md §12.2)
        Row("LPOSS+ (LAION-2B B/16, DINO B/16)", "lposs", False, False, "table1", "LPOSS", {"lposs_plus": True},
            model=LPOSS_MODEL, vfm="dino_b16"),
        Row("LPOSS (LAION-2B B/16, DINO B/16)", "lposs", False, False, None, None, model=LPOSS_MODEL, vfm="dino_b16"),
        # PEARL's Table 1 ran CASS with DINOv2 B/14 with registers and with DINOv3 B/16 (+experiment=cass); its
        # code defaults to DINO ViT-B/8
        Row("CASS (DINOv2 B/14 reg.)", "cass", False, False, "table1", "CASS (DINOv2)", vfm="dinov2_b14_reg"),
        Row("CASS (DINOv3 B/16)", "cass", False, False, "table1", "CASS (DINOv3)", vfm="dinov3_b16"),
        Row("CASS (DINO B/8, its code's default)", "cass", False, False, None, None, vfm="dino_b8"),
        # not in PEARL's Table 1, and its repository publishes no numbers (docs/methods.md §14)
        Row("GLA-CLIP (DINO B/8)", "glaclip", False, False, None, None, vfm="dino_b8"),
        Row("PEARL", "pearl", True, True, "table1", "PEARL (Ours)", pacc_row="PEARL (Ours)")]
ABLATION = [Row("Vanilla CLIP (full block)", "vanilla", False, False, "table3", "Vanilla CLIP (no PA, no TLP)"),
            Row("PA only", "pearl", True, False, "table3", "PA only"),
            Row("TLP only (reduced block)", "pearl", False, True, "table3", "TLP only"),
            Row("TLP only (full block)", "pearl", False, True, "table3", "TLP only", {"arch": "vanilla"}),
            Row("PA + TLP (PEARL)", "pearl", True, True, "table3", "PA + TLP (PEARL)", pacc_row="PEARL (Ours)")]
PLUG_AND_PLAY = [Row(f"{title} {tag}", method, False, tlp, "table4" if paper else None,
                     f"{title} {tag}" if paper else None)
                 for title, method, paper in (("SCLIP", "sclip", True), ("NACLIP", "naclip", True),
                                              ("SFP", "sfp", True), ("SC-CLIP", "scclip", False),
                                              ("ClearCLIP", "clearclip", False),
                                              ("MaskCLIP", "maskclip", False), ("GEM", "gem", False),
                                              ("CLIP", "vanilla", False))
                 for tag, tlp in (("without TLP", False), ("with TLP", True))]
RESOLUTION = [Row(f"short side {side}", "pearl", True, True, "table5", f"short side {side}", {"resize_short": side})
              for side in (224, 280, 336)]
# The paper's description against the released code: PEARL with each paper variant alone, then all
# (pearl/params.py ``paper``; docs/pearl.md §6); beside the paper's Table 1 PEARL numbers, and
# each cell's difference to the released-code row (``_delta`` columns).
CODE_VS_PAPER = [Row(title, "pearl", True, True, "table1", "PEARL (Ours)", overrides, pacc_row="PEARL (Ours)")
                 for title, overrides in code_vs_paper_runs()]
DELTA_BASELINES = {"code_vs_paper": CODE_VS_PAPER[0].title}
BACKBONE_MODELS = (("ViT-B/32", "ViT-B-32:openai"), ("ViT-B/16", "ViT-B-16:openai"), ("ViT-L/14", "ViT-L-14:openai"))
TABLES = {"main": MAIN, "ablation": ABLATION, "plug_and_play": PLUG_AND_PLAY, "resolution": RESOLUTION,
          "code_vs_paper": CODE_VS_PAPER}


def backbone_rows(records: list[RunRecord]) -> list[Row]:
    """Table 6 and the method × backbone table: PEARL (PA + TLP, own protocol) on the paper's three
    models (with its cells), then every (method, PA, TLP, model) the records hold, at its own protocol."""
    rows = [Row(f"PEARL {title}", "pearl", True, True, "table6", f"PEARL {title}", model=label)
            for title, label in BACKBONE_MODELS]
    paper_rows = {("pearl", True, True, label) for _, label in BACKBONE_MODELS}
    present = sorted({(r.method, r.pa, r.tlp, r.model_label) for r in records} - paper_rows)
    return rows + [Row(_backbone_title(method, pa, tlp, label), method, pa, tlp, None, None, model=label)
                   for method, pa, tlp, label in present]


def _backbone_title(method: str, pa: bool, tlp: bool, label: str) -> str:
    if (method, pa, tlp) == ("pearl", True, True):
        return f"PEARL {label}"
    return " ".join([method] + [name for name, on in (("PA", pa), ("TLP", tlp)) if on] + [label])


def backbone_table(records: list[RunRecord], paper: pd.DataFrame, selection: Selection) -> pd.DataFrame:
    """``backbone_rows`` built; rows without a paper cell or a run of their own protocol left out
    (a record made with other settings names a row whose cells would all be empty)."""
    table = build_table(records, paper, backbone_rows(records), "mIoU", selection)
    ours = [column for column in table.columns if column.endswith("_ours")]
    return table[(table["paper_source"] != "") | table[ours].notna().any(axis=1)].reset_index(drop=True)


def by_model(table: pd.DataFrame) -> pd.DataFrame:
    """The method × backbone table from ``backbone_table``: one row per (method, PA, TLP), and per
    model (in order of appearance) each dataset's and the average's mIoU as ``<model> <column>``, the
    paper's beside it as ``<model> <column> paper`` where it has one (Table 6)."""
    titles = [column[:-len("_ours")] for column in table.columns if column.endswith("_ours")]
    lines: dict[tuple, dict] = {}
    for _, line in table.iterrows():
        entry = lines.setdefault((line["method"], line["pa"], line["tlp"]),
                                 {"method": line["method"], "pa": line["pa"], "tlp": line["tlp"]})
        for title in titles:
            entry[f"{line['model']} {title}"] = line[f"{title}_ours"]
            if pd.notna(line[f"{title}_paper"]):
                entry[f"{line['model']} {title} paper"] = line[f"{title}_paper"]
    return pd.DataFrame(list(lines.values()))


def default_paper_dir() -> Path:
    beside_package = Path(__file__).resolve().parents[1] / "results" / "paper"
    return beside_package if beside_package.is_dir() else Path("results/paper")


def load_paper(paper_dir: str | Path) -> pd.DataFrame:
    frames = [pd.read_csv(path, dtype={"value": "float64"}, keep_default_na=False, na_values=[""])
              for path in sorted(Path(paper_dir).glob("*.csv"))]
    if not frames:
        raise FileNotFoundError(f"no paper-number CSVs in {paper_dir}; pass --paper results/paper")
    return pd.concat(frames, ignore_index=True)


def _settings_for(row: Row, dataset: str) -> dict | None:
    try:
        return comparable(job_settings(row.method, row.pa, row.tlp, dataset, row.profile, row.overrides))
    except ValueError:  # a row that cannot exist (e.g. a method without this dataset's protocol)
        return None


def candidates(records: list[RunRecord], row: Row, dataset: str, selection: Selection) -> list[RunRecord]:
    """The records whose identity satisfies this cell (see :class:`Row`)."""
    wanted = _settings_for(row, dataset)
    model = row.model or selection.model
    return [r for r in records
            if r.dataset == dataset and r.method == row.method and r.pa == row.pa and r.tlp == row.tlp
            and r.profile == row.profile and r.model_label == model and selection.admits(r)
            and row.vfm in (None, vfm_name(r))
            and comparable(r.params) == wanted]


def vfm_name(record: RunRecord) -> str | None:
    """The second vision model a record ran with (its model identity's ``vfm``, ``NAME:…``)."""
    label = record.model.get("vfm")
    return label.split(":")[0] if label else None  # the costly comparison last, on the few that got this far


def choose(found: list[RunRecord], selection: Selection) -> Cell:
    """The rule for several candidates: current code first, then the full split, then the larger
    share of its split evaluated (a whole folder before a newer ``max_images`` subset), then the
    newest (compared as times, whatever their offsets)."""
    if not found:
        return Cell(None)
    best = max(found, key=lambda r: (r.code_version == selection.code, r.full_split, r.evaluated_share,
                                     r.finished_time))
    flags = (("stale",) if best.code_version != selection.code else ()) + (("partial",) if not best.full_split
                                                                          else ())
    return Cell(best, flags + ((f"of {len(found)}",) if len(found) > 1 else ()))


def _paper(paper: pd.DataFrame, row: Row, dataset: str, metric: str) -> tuple[float | None, str]:
    """The paper's value of ``metric`` (mIoU, or aAcc: its pAcc table) beside ``row`` on ``dataset``; its status."""
    table, paper_row = ("table2", row.pacc_row) if metric == "aAcc" else (row.paper_table, row.paper_row)
    if table is None or paper_row is None:
        return None, "—"
    hit = paper[(paper.table == table) & (paper.row == paper_row) & (paper.dataset == dataset)]
    if hit.empty:
        return None, "—"
    value = hit.iloc[0]["value"]
    return (None if pd.isna(value) else float(value)), str(hit.iloc[0]["status"])


def _cell_columns(records: list[RunRecord], paper: pd.DataFrame, row: Row, dataset: str, metric: str,
                  selection: Selection) -> tuple[dict, float | None, list[str]]:
    """One dataset's columns of a row (ours / paper / diff / flags / record), its value and its flags."""
    cell = choose(candidates(records, row, dataset, selection), selection)
    ours = None if cell.record is None else getattr(cell.record, metric)
    paper_value, status = _paper(paper, row, dataset, metric)
    title = COLUMN_TITLES[dataset]
    columns = {f"{title}_ours": None if ours is None else round(ours, 2), f"{title}_paper": paper_value,
               f"{title}_paper_status": status,
               f"{title}_diff": None if ours is None or paper_value is None else round(ours - paper_value, 2),
               f"{title}_flags": ",".join(cell.flags),
               f"{title}_record": cell.record.config_hash if cell.record else ""}
    return columns, ours, list(cell.flags)


def build_table(records: list[RunRecord], paper: pd.DataFrame, rows: list[Row], metric: str = "mIoU",
                selection: Selection | None = None) -> pd.DataFrame:
    """Wide table: per dataset ours / paper / diff / flags / record, then the averages and completeness
    (over the paper's eight), then the extra datasets the model has records of (no paper values)."""
    selection = selection or Selection()
    extra = [d for d in EXTRA_DATASETS if any(r.dataset == d and r.model_label == selection.model for r in records)]
    out = []
    for row in rows:
        line = {"row": row.title, "method": row.method, "pa": row.pa, "tlp": row.tlp,
                "overrides": ";".join(f"{k}={v}" for k, v in row.overrides.items()),
                "model": row.model or selection.model,
                "paper_source": f"{row.paper_table}: {row.paper_row}" if row.paper_table else ""}
        values, flagged = [], []
        for dataset in DATASETS:
            columns, ours, flags = _cell_columns(records, paper, row, dataset, metric, selection)
            line.update(columns)
            values.append(ours)
            if flags:
                flagged.append(f"{COLUMN_TITLES[dataset]}({','.join(flags)})")
        missing = [COLUMN_TITLES[d] for d, v in zip(DATASETS, values) if v is None]
        complete = not missing
        avg = sum(values) / len(values) if complete else None
        avg_rounded = sum(round(v, 2) for v in values) / len(values) if complete else None
        paper_avg, paper_status = _paper(paper, row, "avg_printed", metric)
        line.update({"Avg_ours": None if avg is None else round(avg, 2),
                     "Avg_ours_of_rounded": None if avg_rounded is None else round(avg_rounded, 2),
                     "Avg_paper": paper_avg, "Avg_paper_status": paper_status,
                     "Avg_diff": None if avg is None or paper_avg is None else round(avg - paper_avg, 2)})
        for dataset in extra:
            columns, _, flags = _cell_columns(records, paper, row, dataset, metric, selection)
            line.update(columns)
            if flags:
                flagged.append(f"{COLUMN_TITLES[dataset]}({','.join(flags)})")
        line.update({"complete": complete, "missing": ",".join(missing), "flagged": " ".join(flagged)})
        out.append(line)
    return pd.DataFrame(out)


def with_deltas(table: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """The table with ``<column>_delta`` = ours − the ``baseline`` row's ours, per dataset and the average."""
    table = table.copy()
    reference = table.set_index("row").loc[baseline]
    for column in [c[: -len("_ours")] for c in table.columns if c.endswith("_ours")]:
        base = reference[f"{column}_ours"]
        table[f"{column}_delta"] = [None if pd.isna(v) or pd.isna(base) else round(v - base, 2)
                                    for v in table[f"{column}_ours"]]
    return table


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def _model_note(model: str) -> str:
    note = f"Model: {model}."
    if model.startswith("tiny"):
        note += " **Smoke figures of a randomly initialised network, not results.**"
    return note


def to_markdown(table: pd.DataFrame, note: str = "") -> str:
    """Cells as 'ours / paper (diff)' with flags; empty where unknown."""
    titles = [COLUMN_TITLES[d] for d in DATASETS] + ["Avg"] + [
        COLUMN_TITLES[d] for d in EXTRA_DATASETS if f"{COLUMN_TITLES[d]}_ours" in table.columns]
    lines = ([note, ""] if note else []) + ["| row | " + " | ".join(titles) + " | missing | model |",
                                            "|---" * (len(titles) + 3) + "|"]
    for _, r in table.iterrows():
        cells = []
        for title in titles:
            ours, paper, diff = r[f"{title}_ours"], r[f"{title}_paper"], r[f"{title}_diff"]
            text = f"{_fmt(ours) or '·'} / {_fmt(paper) or '·'}"
            if _fmt(diff):
                text += f" ({diff:+.2f})"
            delta = r.get(f"{title}_delta")
            if _fmt(delta) and r["row"] not in DELTA_BASELINES.values():
                text += f" Δ{delta:+.2f}"
            flags = r.get(f"{title}_flags")
            if isinstance(flags, str) and flags:
                text += f" [{flags}]"
            cells.append(text)
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {r['missing']} | {r['model']} |")
    lines.append("")
    lines.append("Cells: ours / paper (ours − paper); '·' = no run or no known paper value. Avg only over "
                 "complete rows (all eight datasets). [stale] = made by older code, [partial] = not the full "
                 "official split (shown only with --include-stale / --include-partial), [of N] = N records "
                 "satisfy the cell: the one of the current code, full split, newest, is shown."
                 + (" Δ = ours − the released-code row's ours." if any(c.endswith("_delta") for c in table.columns)
                    else ""))
    return "\n".join(lines) + "\n"


def pivot(records: list[RunRecord], param: str, selection: Selection | None = None,
          method: str | None = None) -> pd.DataFrame:
    """Rows = the values of ``param`` among runs that differ from their protocol in ``param`` alone
    (or not at all), per (method, pa, tlp, profile); columns = datasets (mIoU)."""
    _check_pivot(param)
    selection = selection or Selection()
    groups: dict[tuple, dict[str, list[RunRecord]]] = {}
    for r in records:
        if (r.dataset not in DATASETS or r.model_label != selection.model or (method and r.method != method)
                or not selection.admits(r)):
            continue
        if not set(deviations(r.method, r.dataset, r.profile, r.params)) <= {param}:
            continue
        key = (r.method, r.pa, r.tlp, r.profile, json.dumps(r.params[param]))
        groups.setdefault(key, {}).setdefault(r.dataset, []).append(r)
    out = []
    def order(item):  # numeric values in numeric order (40 before 160), others as text
        *head, value = item[0]
        value = json.loads(value)
        return (*head, isinstance(value, str), value if isinstance(value, (int, float)) else 0, str(value))

    for (method_name, pa, tlp, profile, value), by_dataset in sorted(groups.items(), key=order):
        line = {"method": method_name, "pa": pa, "tlp": tlp, "profile": profile, param: json.loads(value)}
        for dataset in DATASETS:
            cell = choose(by_dataset.get(dataset, []), selection)
            line[COLUMN_TITLES[dataset]] = None if cell.record is None else round(cell.record.mIoU, 2)
            line[f"{COLUMN_TITLES[dataset]}_flags"] = ",".join(cell.flags)
        out.append(line)
    columns = ["method", "pa", "tlp", "profile", param] + [c for d in DATASETS
                                                           for c in (COLUMN_TITLES[d], f"{COLUMN_TITLES[d]}_flags")]
    return pd.DataFrame(out, columns=columns)


def grid_points(records: list[RunRecord], selection: Selection | None = None) -> tuple[pd.DataFrame, list[str]]:
    """([dataset, tlp_grid, mIoU] of PEARL runs (PA and TLP on, own protocol) that differ from the
    protocol in ``tlp_grid`` alone, selected as the tables select, and their cells' flags): Fig. 4."""
    table = pivot(records, "tlp_grid", selection, method="pearl")
    table = table[table.pa & table.tlp & (table.profile == "own")] if not table.empty else table
    rows, flags = [], []
    for _, line in table.iterrows():
        for dataset in DATASETS:
            title = COLUMN_TITLES[dataset]
            if pd.notna(line[title]):
                rows.append({"dataset": dataset, "tlp_grid": line["tlp_grid"], "mIoU": line[title]})
                flags += [line[f"{title}_flags"]] if line[f"{title}_flags"] else []
    frame = pd.DataFrame(rows, columns=["dataset", "tlp_grid", "mIoU"])
    return frame.sort_values(["dataset", "tlp_grid"]).reset_index(drop=True), flags


def _check_pivot(param: str) -> None:
    if param not in PARAMS:
        raise ValueError(f"--pivot {param!r} is not a parameter; valid: {', '.join(PARAMS)}")


def _write(table: pd.DataFrame, out_dir: Path, name: str, note: str, render=to_markdown) -> Path:
    """``name``.csv and, unless ``render`` is None, ``name``.md as ``render(table, note)`` writes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{name}.csv"
    table.to_csv(csv_path, index=False)
    if render is not None:
        (out_dir / f"{name}.md").write_text(render(table, note))
    return csv_path


def plain_markdown(table: pd.DataFrame, note: str = "") -> str:
    """A table as it is, one cell per value ('·' where there is none)."""
    lines = ([note, ""] if note else []) + ["| " + " | ".join(map(str, table.columns)) + " |",
                                            "|---" * len(table.columns) + "|"]
    lines += ["| " + " | ".join(_fmt(value) or "·" if not isinstance(value, str) else value for value in row) + " |"
              for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _draw(tables: dict[str, pd.DataFrame], records: list[RunRecord], selection: Selection, folder: Path
          ) -> dict[str, Path]:
    """The figures of one model's tables into ``folder/figures``: ours vs paper per table, the
    PA × TLP heat map, and Fig. 4 (with its points as CSV) when there is a tlp_grid sweep."""
    figures_dir, model = folder / "figures", selection.model
    drawn = {f"figures/{name}": figures.comparison_bars(table, name, model, figures_dir / f"{name}.png",
                                                        "pAcc" if name.endswith("_pacc") else "mIoU")
             for name, table in tables.items()}
    drawn["figures/ablation_pa_tlp"] = figures.ablation_heatmap(tables["ablation"], model,
                                                                figures_dir / "ablation_pa_tlp.png")
    points, flags = grid_points(records, selection)
    if points["tlp_grid"].nunique() > 1:  # a sweep: the protocol's own grid alone is one point
        points.to_csv(figures_dir / "fig4_tlp_grid.csv", index=False)
        drawn["figures/fig4_tlp_grid"] = figures.grid_figure(points, model, figures_dir / "fig4_tlp_grid.png", flags)
    return drawn


def write_tables(results_dir: str | Path = "results", paper_dir: str | Path | None = None,
                 out_dir: str | Path | None = None, models: tuple[str, ...] = (DEFAULT_MODEL,),
                 include_partial: bool = False, include_stale: bool = False,
                 pivots: tuple[str, ...] = (), draw: bool = True,
                 records: list[RunRecord] | None = None) -> tuple[dict[str, Path], int]:
    """Write every table (and, with ``draw``, its figures) from ``records`` (default: those under
    ``results_dir``); returns the paths by name and the number of records read.

    The paper tables are written per model: the default model's into ``out_dir``, any other's into
    ``out_dir/<model>/``, each with a ``figures/`` folder; Table 6 (``backbones``) once. Raises
    NoRecords when there is nothing to tabulate (then nothing is written).
    """
    for param in pivots:
        _check_pivot(param)  # before anything is written
    records = load_records(results_dir) if records is None else records
    if not records:
        raise NoRecords(f"no result records under {Path(results_dir) / 'runs'}: run `python run.py ...` "
                        f"(results_dir={results_dir}) first; nothing written")
    present = sorted({r.model_label for r in records})
    wanted = tuple(dict.fromkeys(present if "all" in models else models))
    absent = [m for m in wanted if m not in present]
    if absent and len(absent) == len(wanted):
        raise NoRecords(f"no records of model(s) {', '.join(absent)} under {results_dir}; models present: "
                        f"{', '.join(present)} (choose with --model); nothing written")
    paper = load_paper(paper_dir or default_paper_dir())
    out_dir = Path(out_dir or results_dir)
    written = {}
    for model in wanted:
        if model in absent:
            print(f"no records of model {model}; its tables are not written")
            continue
        selection = Selection(model, include_partial, include_stale)
        folder = out_dir if model == DEFAULT_MODEL else out_dir / path_component(model)
        key_prefix = "" if model == DEFAULT_MODEL else f"{model}/"
        tables = {}
        for name, rows in TABLES.items():
            for metric, suffix in (("mIoU", ""), ("aAcc", "_pacc")):
                table = build_table(records, paper, rows, metric, selection)
                if name in DELTA_BASELINES:
                    table = with_deltas(table, DELTA_BASELINES[name])
                tables[f"{name}{suffix}"] = table
                written[f"{key_prefix}{name}{suffix}"] = _write(table, folder, f"{name}{suffix}", _model_note(model))
        if draw:
            written |= {key_prefix + key: path for key, path in _draw(tables, records, selection, folder).items()}
        for param in pivots:
            written[f"{key_prefix}pivot_{param}"] = _write(pivot(records, param, selection), folder,
                                                           f"pivot_{param}", "", render=None)
    table = backbone_table(records, paper, Selection(DEFAULT_MODEL, include_partial, include_stale))
    smoke = any(str(model).startswith("tiny") for model in table.get("model", []))
    def smoke_note(parts: str) -> str:
        return f" **{parts} of model tiny: smoke figures of a randomly initialised network, not results.**" \
            if smoke else ""
    written["backbones"] = _write(table, out_dir, "backbones", "Models: each row's own." + smoke_note("Rows"))
    written["backbones_by_model"] = _write(by_model(table), out_dir, "backbones_by_model",
                                           "Method × backbone: mIoU per model and dataset; `paper`: Table 6."
                                           + smoke_note("Columns"), render=plain_markdown)
    if draw:
        written["figures/backbones"] = figures.comparison_bars(
            table, "backbones", "each row's own" + (", incl. tiny" if smoke else ""),
            out_dir / "figures" / "backbones.png")
    return written, len(records)


def why_cells_are_empty(records: list[RunRecord], models: tuple[str, ...] | list[str], include_partial: bool,
                        include_stale: bool) -> str:
    """A line saying why records of the tables' models fill no cell (all partial, all of older code),
    with the option that admits them; "" when some record can fill one."""
    if "all" in models:
        models = sorted({r.model_label for r in records})
    mine = [r for r in records if r.model_label in models]
    if not mine:
        return f"no record of model {', '.join(models)}: the tables are empty (--model names another model)"
    selection = Selection(include_partial=include_partial, include_stale=include_stale)
    if any(selection.admits(r) for r in mine):
        return ""
    partial = [r for r in mine if not r.full_split]
    stale = [r for r in mine if r.code_version != selection.code]
    reasons = []
    if partial and not include_partial:
        reasons.append(f"{len(partial)} are partial (max_images, skipped images, or not the official split's size): "
                       f"--include-partial shows them, marked [partial]")
    if stale and not include_stale:
        reasons.append(f"{len(stale)} were made by older code: --include-stale shows them, marked [stale]")
    return f"the tables have no cell: of the {len(mine)} record(s) of this model, " + "; ".join(reasons)


class NoRecords(RuntimeError):
    """Nothing to tabulate."""


def _hydra_style(tokens: list[str]) -> dict[str, str]:
    """``key=value`` arguments as a recipe passes them on to run.py (results_dir, model, …)."""
    pairs = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep:
            raise SystemExit(f"unexpected argument {token!r}; options are --flags, run.py overrides are key=value")
        pairs[key.lstrip("+")] = value
    return pairs


def recipe_arguments(tokens: list[str]) -> tuple[str | None, str | None]:
    """(results_dir, model label) named by run.py overrides that a recipe passes on, or None each."""
    pairs = _hydra_style(tokens)
    return pairs.get("results_dir"), _model_from_overrides(pairs)


def _model_from_overrides(pairs: dict[str, str]) -> str | None:
    if pairs.get("model") == "tiny":
        return model_label("tiny", seed=int(pairs.get("model.seed", 0)))
    if "model.name" in pairs or "model.pretrained" in pairs:
        return model_label(pairs.get("model.name", "ViT-B-16"), pairs.get("model.pretrained", "openai"))
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build the paper's tables from result records. Extra key=value arguments are read as run.py "
                    "overrides (results_dir=, model=tiny, model.name=, model.pretrained=), so a recipe can pass its "
                    "own arguments on unchanged.")
    parser.add_argument("--results", default=None, help="folder holding runs/*.json (default: results)")
    parser.add_argument("--paper", default=None, help="folder of the paper CSVs (default: results/paper)")
    parser.add_argument("--out", default=None, help="output folder (default: the results folder)")
    parser.add_argument("--model", action="append", default=None,
                        help=f"model label NAME:TAG of the tables (default {DEFAULT_MODEL}; repeatable; 'all' = "
                             f"every model with records; 'tiny' = the random smoke model)")
    parser.add_argument("--include-partial", action="store_true",
                        help="let partial runs (max_images, skipped images, a split of another size) fill cells, "
                             "marked [partial]")
    parser.add_argument("--include-stale", action="store_true",
                        help="let records made by older code fill cells, marked [stale]")
    parser.add_argument("--pivot", action="append", default=[], metavar="PARAM",
                        help="also write pivot_PARAM.csv: rows = the swept values of PARAM, columns = datasets")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only, not figures/")
    args, rest = parser.parse_known_args(argv)
    results_dir, recipe_model = recipe_arguments(rest)
    results = args.results or results_dir or "results"
    models = [m if m != "tiny" else "tiny:seed0" for m in args.model or []]
    models = models or [m for m in [recipe_model] if m] or [DEFAULT_MODEL]
    records = load_records(results)
    try:
        written, count = write_tables(results, args.paper, args.out, tuple(models), args.include_partial,
                                      args.include_stale, tuple(args.pivot), draw=not args.no_figures,
                                      records=records)
    except (NoRecords, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    tables = [str(path) for key, path in written.items() if "figures/" not in key]
    unused = why_cells_are_empty(records, models, args.include_partial, args.include_stale)
    if unused:
        print(unused, flush=True)
    drawn = [path for key, path in written.items() if "figures/" in key]
    folders = ", ".join(sorted({str(path.parent) for path in drawn}))
    print(f"{count} records → " + ", ".join(tables) + (f"; {len(drawn)} figures in {folders}" if drawn else ""))


if __name__ == "__main__":
    main()
