"""The Hydra app, the results store, the tables and wandb, end to end on synthetic data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

import pearl
from pearl.data.datasets import LAYOUTS
from pearl.data.synthetic import write_dataset
from pearl.records import load_records
from pearl.runner import run

REPO = Path(__file__).resolve().parents[1]


def _compose(overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_dataset("voc21", root, num_images=3, size=(48, 64))
    write_dataset("ade20k", root, num_images=2, size=(48, 64), seed=1)
    return root


def test_config_exposes_every_parameter_as_a_plain_key():
    cfg = _compose([])
    assert all(name in cfg and cfg[name] is None for name in pearl.PARAMS)
    assert cfg.pa is None and cfg.tlp is None and cfg.method.name == "pearl" and cfg.model.name == "ViT-B-16"
    cfg = _compose(["tlp=false", "alpha_kk=0.2", "method=naclip", "dataset=ade20k"])
    assert cfg.tlp is False and cfg.alpha_kk == 0.2


def test_run_record_skip_and_force(synthetic, tmp_path):
    overrides = ["model=tiny", "method=sclip", f"data_root={synthetic}", f"results_dir={tmp_path}", "progress=false",
                 "slide_crop=32", "slide_stride=16"]
    record = run(_compose(overrides))
    files = list((tmp_path / "runs").glob("*.json"))
    assert len(files) == 1 and files[0].stem == record["config_hash"]
    saved = json.loads(files[0].read_text())
    for key in ("mIoU", "aAcc", "mAcc", "per_class_iou", "params", "config_hash", "package_version", "git_commit",
                "device", "images_per_second", "wall_time_s", "image_count", "method", "pa", "tlp", "dataset", "model"):
        assert key in saved, key
    assert saved["image_count"] == 3 and saved["split_matches_official"] is False and saved["expected_images"] == 1449
    assert saved["params"]["slide_crop"] == 32 and saved["params"]["logit_scale"] == 65  # SCLIP's VOC21 protocol
    assert saved["overrides"] == {"slide_crop": 32, "slide_stride": 16}
    assert saved["diagnostics"] == {}  # SCLIP without TLP has no PA / TLP diagnostics
    assert [c["class"] for c in saved["per_class_iou"]] == pearl.class_names("voc21")  # in class order
    mtime = files[0].stat().st_mtime_ns
    again = run(_compose(overrides))
    assert again == saved and files[0].stat().st_mtime_ns == mtime  # skipped
    run(_compose(overrides + ["force=true"]))
    assert files[0].stat().st_mtime_ns != mtime
    with_tlp = run(_compose(overrides + ["tlp=true"]))
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    diagnostics = with_tlp["diagnostics"]
    assert 0 <= diagnostics["tlp_low_confidence"] <= 1 and diagnostics["tlp_rho_mean"] > 0
    assert 0 <= diagnostics["tlp_cg_relative_residual"] < 1


def test_on_error_skip_counts_bad_files(tmp_path):
    root = write_dataset("ade20k", tmp_path / "data", num_images=3, size=(32, 48))
    (root / LAYOUTS["ade20k"].image_dir / "ADE_val_00000002.jpg").write_bytes(b"broken")
    overrides = ["model=tiny", "method=clearclip", "dataset=ade20k", f"data_root={root}",
                 f"results_dir={tmp_path / 'res'}", "progress=false"]
    with pytest.raises(Exception, match="ADE_val_00000002.jpg"):
        run(_compose(overrides))
    assert not (tmp_path / "res" / "runs").exists() or not list((tmp_path / "res" / "runs").glob("*.json"))
    record = run(_compose(overrides + ["on_error=skip"]))
    assert record["image_count"] == 2 and record["skipped"][0]["id"] == "ADE_val_00000002"


def test_pa_for_a_method_without_query_key_fails_before_loading(synthetic, tmp_path):
    with pytest.raises(ValueError, match="query·key"):
        run(_compose(["model=tiny", "method=naclip", "pa=true", f"data_root={synthetic}", f"results_dir={tmp_path}"]))


def test_wandb_offline_logs_and_finishes(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = ["model=tiny", "logger=wandb", f"logger.dir={tmp_path}", f"data_root={synthetic}",
                 f"results_dir={tmp_path / 'res'}", "progress=false", "logger.max_images=2"]
    run(_compose(overrides + ["method=pearl"]), group="sweep-x")
    run(_compose(overrides + ["method=naclip"]), group="sweep-x")
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one wandb run per job, each finished
    for run_dir in runs:
        images = list(run_dir.rglob("media/images/*.png"))
        tables = list(run_dir.rglob("media/table/*.json"))
        assert len(images) >= 2 and tables
        table = json.loads(tables[0].read_text())
        assert table["columns"] == ["class", "IoU"] and len(table["data"]) == 21
        assert list(run_dir.glob("run-*.wandb"))


def test_wandb_failure_does_not_fail_the_run(synthetic, tmp_path, monkeypatch):
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("no wandb today")
    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="no wandb today"):
        record = run(_compose(["model=tiny", "logger=wandb", f"data_root={synthetic}",
                               f"results_dir={tmp_path}", "progress=false"]))
    assert record["image_count"] == 3


def _sweep(args, cwd):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "run.py"), "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sweep_tables_and_resume_in_a_subprocess(synthetic, tmp_path):
    results = tmp_path / "results"
    args = ["method=pearl,naclip", "tlp=true,false", "dataset=voc21", "model=tiny", f"data_root={synthetic}",
            f"results_dir={results}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false"]
    first = _sweep(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    records = load_records(results)
    assert sorted((r["method"], r["tlp"]) for r in records) == [("naclip", False), ("naclip", True),
                                                                 ("pearl", False), ("pearl", True)]
    tables = subprocess.run([sys.executable, "-m", "pearl.tables", "--results", str(results)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert tables.returncode == 0, tables.stderr
    main = pd.read_csv(results / "main.csv")
    assert list(main["row"]) == ["CLIP", "SCLIP", "NACLIP (no PAMR)", "ClearCLIP", "SFP", "PEARL"]
    assert [c for c in main.columns if c.endswith("_ours")] == [
        "VOC21_ours", "PC60_ours", "Object_ours", "VOC20_ours", "PC59_ours", "Stuff_ours", "City_ours", "ADE_ours",
        "Avg_ours"]
    pearl_row = main.set_index("row").loc["PEARL"]
    by_key = {(r["method"], r["tlp"]): r for r in records}
    assert pearl_row["VOC21_ours"] == pytest.approx(round(by_key[("pearl", True)]["mIoU"], 2))
    assert pearl_row["VOC21_paper"] == 64.1 and pearl_row["Avg_paper"] == 43.2
    assert pearl_row["VOC21_diff"] == pytest.approx(round(pearl_row["VOC21_ours"] - 64.1, 2), abs=0.011)
    assert pd.isna(pearl_row["Avg_ours"]) and not pearl_row["complete"]  # 7 datasets missing: no average
    assert "PC60" in pearl_row["missing"]
    assert pd.isna(main.set_index("row").loc["SCLIP", "VOC21_ours"])  # no run → empty, never a guess
    plug = pd.read_csv(results / "plug_and_play.csv").set_index("row")
    assert plug.loc["NACLIP with TLP", "VOC21_ours"] == pytest.approx(round(by_key[("naclip", True)]["mIoU"], 2))
    assert plug.loc["NACLIP with TLP", "Avg_paper"] == 42.3
    ablation = pd.read_csv(results / "ablation.csv").set_index("row")
    assert ablation.loc["PA only", "VOC21_ours"] == pytest.approx(round(by_key[("pearl", False)]["mIoU"], 2))
    assert ablation.loc["PA only", "VOC21_paper"] == 59.2
    assert (results / "main.md").read_text().startswith("| row | VOC21 |")
    assert (results / "main_pacc.csv").is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")}
    second = _sweep(args, tmp_path)
    assert second.returncode == 0 and (second.stdout + second.stderr).count("skipping") == 4
    assert {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")} == mtimes


def test_failing_job_leaves_no_record_and_the_sweep_goes_on(synthetic, tmp_path):
    results = tmp_path / "results"
    out = _sweep(["method=vanilla", "dataset=cityscapes,ade20k", "model=tiny", f"data_root={synthetic}",
                  f"results_dir={results}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false"], tmp_path)
    assert out.returncode == 1 and "dataset 'cityscapes' not found" in out.stdout + out.stderr
    assert [r["dataset"] for r in load_records(results)] == ["ade20k"]


def test_sharded_evaluation_equals_one_process(synthetic, tmp_path):
    from pearl.runner import shard_indices
    assert [list(shard_indices(5, r, 3)) for r in range(3)] == [[0], [1, 2], [3, 4]]  # no padding, no overlap
    base = ["model=tiny", "method=naclip", f"data_root={synthetic}", "progress=false", "device=cpu"]
    single = run(_compose(base + [f"results_dir={tmp_path / 'one'}"]))
    sharded = run(_compose(base + [f"results_dir={tmp_path / 'two'}", "workers=2"]))
    assert sharded["workers"] == 2 and sharded["image_count"] == single["image_count"] == 3
    assert sharded["mIoU"] == pytest.approx(single["mIoU"], abs=1e-9)
    assert sharded["per_class_iou"] == single["per_class_iou"]


def _fake_record(dataset, miou, overrides, grid, finished="2026-01-01"):
    params = pearl.protocol("pearl", dataset)
    params.update(overrides, tlp_grid=grid)
    return {"config_hash": f"{dataset}{grid}{sorted(overrides.items())}", "method": "pearl", "pa": True, "tlp": True,
            "profile": "own", "overrides": overrides, "dataset": dataset, "mIoU": miou, "aAcc": 50.0,
            "params": params, "model": {"name": "tiny", "pretrained": None}, "finished_at": finished}


def test_resolution_table_and_grid_figure(tmp_path):
    from pearl.figures import grid_figure, grid_points
    from pearl.records import write_record
    from pearl.tables import write_tables
    write_record(tmp_path, _fake_record("voc21", 61.0, {"resize_short": 224}, 80))
    for grid, miou in ((40, 30.0), (80, 33.0), (160, 31.0)):
        write_record(tmp_path, _fake_record("ade20k", miou, {"tlp_grid": grid} if grid != 80 else {}, grid))
    write_tables(tmp_path)
    resolution = pd.read_csv(tmp_path / "resolution.csv").set_index("row")
    assert resolution.loc["short side 224", "VOC21_ours"] == 61.0 and resolution.loc["short side 224", "Avg_paper"] == 40.4
    points = grid_points(load_records(tmp_path))
    assert points[points.dataset == "ade20k"][["tlp_grid", "mIoU"]].values.tolist() == [[40, 30.0], [80, 33.0],
                                                                                       [160, 31.0]]
    assert (points.dataset == "voc21").sum() == 0  # a resize override is not a grid point
    path = grid_figure(load_records(tmp_path), tmp_path / "fig.png")
    assert path.stat().st_size > 1000 and Image.open(path).size[0] > 100
