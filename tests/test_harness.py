"""The Hydra app, the results store, the tables and wandb, end to end on synthetic data."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

import pearl
from pearl import evaluate as evaluate_module
from pearl import runner
from pearl.benchmarks import BENCHMARKS
from pearl.data.synthetic import write_dataset
from pearl.records import load_records
from pearl.runner import run

from .conftest import REPO, compose


def test_config_exposes_every_parameter_as_a_plain_key():
    cfg = compose([])
    assert all(name in cfg and cfg[name] is None for name in pearl.PARAMS)
    from pearl.config import CONFIG_GROUPS, RUN_KEYS
    assert set(cfg.keys()) == set(RUN_KEYS) | set(pearl.PARAMS) | set(CONFIG_GROUPS)  # nothing undocumented
    raw = OmegaConf.load(REPO / "conf" / "config.yaml")
    assert {key: OmegaConf.to_container(raw)[key] for key in RUN_KEYS} == {k: s.default for k, s in RUN_KEYS.items()}
    assert cfg.pa is None and cfg.tlp is None and cfg.method.name == "pearl" and cfg.model.name == "ViT-B-16"
    cfg = compose(["tlp=false", "alpha_kk=0.2", "method=naclip", "dataset=ade20k"])
    assert cfg.tlp is False and cfg.alpha_kk == 0.2


def test_run_record_skip_and_force(synthetic, tmp_path):
    overrides = ["model=tiny", "method=sclip", f"data_root={synthetic}", f"results_dir={tmp_path}", "progress=false",
                 "slide_crop=32", "slide_stride=16"]
    record = run(compose(overrides))
    files = list((tmp_path / "runs").glob("*.json"))
    assert len(files) == 1 and files[0].stem == record.config_hash
    saved = json.loads(files[0].read_text())
    for key in ("mIoU", "aAcc", "mAcc", "per_class_iou", "params", "config_hash", "package_version", "git_commit",
                "device", "images_per_second", "wall_time_s", "image_count", "method", "pa", "tlp", "dataset", "model"):
        assert key in saved, key
    assert saved["image_count"] == 3 and saved["split_matches_official"] is False and saved["expected_images"] == 1449
    assert saved["params"]["slide_crop"] == 32 and saved["params"]["logit_scale"] == 65  # SCLIP's VOC21 protocol
    assert saved["overrides"] == saved["deviations"] == {"slide_crop": 32, "slide_stride": 16}
    assert saved["full_split"] is False and saved["schema_version"] == 2
    assert saved["images_per_second"] == pytest.approx(3 / saved["eval_time_s"])  # model load not counted
    assert saved["setup_time_s"] > 0 and saved["setup_time_s"] + saved["eval_time_s"] <= saved["wall_time_s"]
    assert saved["diagnostics"] == {}  # SCLIP without TLP has no PA / TLP diagnostics
    assert [c["class"] for c in saved["per_class_iou"]] == pearl.class_names("voc21")  # in class order
    mtime = files[0].stat().st_mtime_ns
    again = run(compose(overrides))
    assert again.to_dict() == saved and files[0].stat().st_mtime_ns == mtime  # skipped
    run(compose(overrides + ["force=true"]))
    assert files[0].stat().st_mtime_ns != mtime
    with_tlp = run(compose(overrides + ["tlp=true"]))
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2
    assert with_tlp.diagnostics == {}  # computed only when asked
    asked = run(compose(overrides + ["tlp=true", "diagnostics=true"]))  # the record lacks them: rerun
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2 and asked.config_hash == with_tlp.config_hash
    assert asked.mIoU == with_tlp.mIoU
    diagnostics = asked.diagnostics
    assert 0 <= diagnostics["tlp_low_confidence"] <= 1 and diagnostics["tlp_rho_mean"] > 0
    assert 0 <= diagnostics["tlp_cg_relative_residual"] < 1


def test_on_error_skip_counts_bad_files(tmp_path):
    root = write_dataset("ade20k", tmp_path / "data", num_images=3, size=(32, 48))
    (root / BENCHMARKS["ade20k"].image_dir / "ADE_val_00000002.jpg").write_bytes(b"broken")
    overrides = ["model=tiny", "method=clearclip", "dataset=ade20k", f"data_root={root}",
                 f"results_dir={tmp_path / 'res'}", "progress=false"]
    with pytest.raises(Exception, match="ADE_val_00000002.jpg"):
        run(compose(overrides))
    assert not (tmp_path / "res" / "runs").exists() or not list((tmp_path / "res" / "runs").glob("*.json"))
    record = run(compose(overrides + ["on_error=skip"]))
    assert record.image_count == 2 and record.skipped[0]["id"] == "ADE_val_00000002" and not record.full_split




def test_dry_run_prints_the_job_and_evaluates_nothing(synthetic, tmp_path, capsys, monkeypatch):
    overrides = ["model=tiny", f"data_root={synthetic}", f"results_dir={tmp_path}", "progress=false", "tlp_grid=40"]
    built = []
    monkeypatch.setattr(evaluate_module, "build_model", lambda *a: built.append(1))
    assert runner.run_job(compose(overrides + ["dry_run=true"]))[0] == "dry_run"
    out = capsys.readouterr().out
    assert "would run" in out and "tlp_grid=40" in out and "prob_thd=0.1" in out  # resolved, not null
    assert built == [] and not (tmp_path / "runs").exists()
    monkeypatch.undo()
    record = run(compose(overrides))
    assert runner.run_job(compose(overrides + ["dry_run=true"]))[0] == "dry_run"
    assert f"record exists: {tmp_path / 'runs' / record.config_hash}.json" in capsys.readouterr().out


def test_dry_run_previews_jobs_whose_data_or_weights_are_missing(synthetic, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    base = [f"results_dir={tmp_path}", "progress=false", "dry_run=true"]
    assert runner.run_job(compose(base + ["model=tiny", f"data_root={tmp_path / 'nowhere'}"]))[0] == "dry_run"
    out = capsys.readouterr().out
    assert "cannot run yet, the data is missing" in out and "nowhere" in out
    assert runner.run_job(compose(base + [f"data_root={synthetic}"]))[0] == "dry_run"  # ViT-B-16 openai, no cache
    assert "weights not cached" in capsys.readouterr().out


def test_wandb_offline_logs_and_finishes(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = ["model=tiny", "logger=wandb", f"logger.dir={tmp_path}", f"data_root={synthetic}",
                 f"results_dir={tmp_path / 'res'}", "progress=false", "logger.max_images=2"]
    run(compose(overrides + ["method=pearl"]), group="sweep-x")
    run(compose(overrides + ["method=naclip"]), group="sweep-x")
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
        record = run(compose(["model=tiny", "logger=wandb", f"data_root={synthetic}",
                               f"results_dir={tmp_path}", "progress=false"]))
    assert record.image_count == 3


def _sweep(args, cwd):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "run.py"), "-m", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a subprocess of run.py / pearl.tables
def test_sweep_tables_and_resume_in_a_subprocess(synthetic, tmp_path):
    results = tmp_path / "results"
    args = ["method=pearl,naclip", "tlp=true,false", "dataset=voc21", "model=tiny", f"data_root={synthetic}",
            f"results_dir={results}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false"]
    first = _sweep(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep: 4 ran, 0 skipped, 0 failed" in first.stderr
    records = load_records(results)
    assert sorted((r.method, r.tlp) for r in records) == [("naclip", False), ("naclip", True),
                                                         ("pearl", False), ("pearl", True)]
    # the recipe's own arguments, passed on unchanged: results_dir= and model=tiny select folder and model
    tables = subprocess.run([sys.executable, "-m", "pearl.tables", "--include-partial", *args[3:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert tables.returncode == 0, tables.stderr
    folder = results / "tiny_seed0"  # a model other than the paper's gets its own folder
    main = pd.read_csv(folder / "main.csv")
    assert list(main["row"]) == ["CLIP", "SCLIP", "NACLIP (no PAMR)", "MaskCLIP", "GEM", "ClearCLIP", "SFP", "SC-CLIP",
                                 "SCLIP + ResCLIP", "NACLIP + ResCLIP", "ClearCLIP + ResCLIP",
                                 "ProxyCLIP (DINOv2 B/14 reg.)", "ProxyCLIP (DINO B/8, its code's default)",
                                 "LPOSS+ (LAION-2B B/16, DINO B/16)", "LPOSS (LAION-2B B/16, DINO B/16)",
                                 "CASS (DINOv2 B/14 reg.)", "CASS (DINOv3 B/16)", "CASS (DINO B/8, its code's default)",
                                 "GLA-CLIP (DINO B/8)", "PEARL"]
    beside = main.set_index("row")  # rows outside PEARL's Table 1 carry their own published numbers
    assert beside.loc["SC-CLIP", "paper_source"] == "own_sources: SC-CLIP README figure"
    assert beside.loc["SC-CLIP", "VOC21_paper"] == 64.6 and beside.loc["NACLIP + ResCLIP", "ADE_paper"] == 18.0
    # PEARL's Table 1 ProxyCLIP ran DINOv2 with registers: its cells sit beside that row only
    assert beside.loc["ProxyCLIP (DINOv2 B/14 reg.)", "VOC21_paper"] == 58.6
    assert pd.isna(beside.loc["ProxyCLIP (DINO B/8, its code's default)", "VOC21_paper"])
    assert beside.loc["CASS (DINOv2 B/14 reg.)", "VOC20_paper"] == 86.1
    assert beside.loc["CASS (DINOv3 B/16)", "VOC20_paper"] == 87.6
    assert beside.loc["PEARL", "paper_source"] == "table1: PEARL (Ours)"
    assert [c for c in main.columns if c.endswith("_ours")] == [
        "VOC21_ours", "PC60_ours", "Object_ours", "VOC20_ours", "PC59_ours", "Stuff_ours", "City_ours", "ADE_ours",
        "Avg_ours"]
    pearl_row = main.set_index("row").loc["PEARL"]
    by_key = {(r.method, r.tlp): r for r in records}
    assert pearl_row["VOC21_ours"] == pytest.approx(round(by_key[("pearl", True)].mIoU, 2))
    assert pearl_row["VOC21_flags"] == "partial" and pearl_row["VOC21_record"] == by_key[("pearl", True)].config_hash
    assert pearl_row["VOC21_paper"] == 64.1 and pearl_row["Avg_paper"] == 43.2
    assert pearl_row["VOC21_diff"] == pytest.approx(round(pearl_row["VOC21_ours"] - 64.1, 2), abs=0.011)
    assert pd.isna(pearl_row["Avg_ours"]) and not pearl_row["complete"]  # 7 datasets missing: no average
    assert "PC60" in pearl_row["missing"]
    assert pd.isna(main.set_index("row").loc["SCLIP", "VOC21_ours"])  # no run → empty, never a guess
    plug = pd.read_csv(folder / "plug_and_play.csv").set_index("row")
    assert plug.loc["NACLIP with TLP", "VOC21_ours"] == pytest.approx(round(by_key[("naclip", True)].mIoU, 2))
    assert plug.loc["NACLIP with TLP", "Avg_paper"] == 42.3
    ablation = pd.read_csv(folder / "ablation.csv").set_index("row")
    assert ablation.loc["PA only", "VOC21_ours"] == pytest.approx(round(by_key[("pearl", False)].mIoU, 2))
    assert ablation.loc["PA only", "VOC21_paper"] == 59.2
    markdown = (folder / "main.md").read_text()
    assert markdown.startswith("Model: tiny:seed0. **Smoke figures") and "[partial]" in markdown
    assert (folder / "main_pacc.csv").is_file() and not (results / "main.csv").exists()
    # 10 tables + the PA × TLP heat map for the model, Table 6 for all models
    assert f"12 figures in {results / 'figures'}, {folder / 'figures'}" in tables.stdout
    assert (folder / "figures" / "ablation_pa_tlp.png").is_file()

    mtimes = {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")}
    second = _sweep(args, tmp_path)
    assert second.returncode == 0 and (second.stdout + second.stderr).count("skipping") == 4
    assert "sweep: 0 ran, 4 skipped, 0 failed" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in (results / "runs").glob("*.json")} == mtimes


def test_failing_job_is_one_line_and_counted_and_the_sweep_goes_on(synthetic, tmp_path):
    results = tmp_path / "results"
    out = _sweep(["method=vanilla", "dataset=cityscapes,ade20k", "model=tiny", f"data_root={synthetic}",
                  f"results_dir={results}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false"], tmp_path)
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dataset 'cityscapes' not found" in errors[0]
    assert "Traceback" not in out.stdout + out.stderr
    assert "sweep: 1 ran, 0 skipped, 1 failed\n  failed: [method=vanilla dataset=cityscapes" in out.stderr
    assert [r.dataset for r in load_records(results)] == ["ade20k"]


def test_sharded_evaluation_equals_one_process(synthetic, tmp_path):
    from pearl.distributed import shard_indices
    assert [list(shard_indices(5, r, 3)) for r in range(3)] == [[0], [1, 2], [3, 4]]  # no padding, no overlap
    base = ["model=tiny", "method=naclip", f"data_root={synthetic}", "progress=false", "device=cpu"]
    single = run(compose(base + [f"results_dir={tmp_path / 'one'}"]))
    sharded = run(compose(base + [f"results_dir={tmp_path / 'two'}", "workers=2"]))
    assert sharded.workers == 2 and sharded.image_count == single.image_count == 3
    assert sharded.config_hash == single.config_hash  # workers do not change the identity
    assert sharded.mIoU == pytest.approx(single.mIoU, abs=1e-9)
    assert sharded.per_class_iou == single.per_class_iou


def test_runner_holds_one_prediction_at_a_time_and_obeys_on_error_for_oversized_files(synthetic, tmp_path,
                                                                                     monkeypatch):
    import weakref

    from pearl.joint import JointPrediction
    original, original_group, alive = evaluate_module.predict_jointly, JointPrediction.predict_group, []

    def predict_jointly(segmentors, images, on_device=False):
        for outputs in original(segmentors, images, on_device):
            alive.extend(weakref.ref(out) for out in outputs)
            yield outputs
            del outputs  # this wrapper must not be what keeps them

    def predict_group(*args, **kwargs):  # when the next image's predictions start to be made
        assert all(ref() is None for ref in alive), "the previous prediction is still referenced"
        return original_group(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "predict_jointly", predict_jointly)
    monkeypatch.setattr(JointPrediction, "predict_group", predict_group)
    root = write_dataset("ade20k", tmp_path / "data", num_images=3, size=(32, 48))
    write_dataset("ade20k", tmp_path / "large", num_images=3, size=(64, 96))
    layout = BENCHMARKS["ade20k"]
    for folder, suffix in ((layout.image_dir, ".jpg"), (layout.label_dir, ".png")):
        name = f"ADE_val_00000002{suffix}"
        (root / folder / name).write_bytes((tmp_path / "large" / folder / name).read_bytes())
    overrides = ["model=tiny", "dataset=ade20k", f"data_root={root}", f"results_dir={tmp_path / 'res'}",
                 "progress=false"]
    assert run(compose(overrides)).image_count == 3 and len(alive) == 3
    from pearl.data import DatasetError
    limited = overrides + ["max_pixels=6000", f"results_dir={tmp_path / 'limited'}"]
    with pytest.raises(DatasetError, match=r"ADE_val_00000002.jpg is 96×64 = 6,144 pixels, above max_pixels=6,000"):
        run(compose(limited))
    record = run(compose(limited + ["on_error=skip"]))
    assert record.image_count == 2 and record.skipped[0]["id"] == "ADE_val_00000002"


@pytest.mark.parametrize(("params", "message"), [
    ({"slide_crop": 224, "slide_stride": 300}, "slide_stride=300 is larger than slide_crop=224"),
    ({"tlp_kappa": -1.0}, "tlp_kappa=-1.0 is out of range"),
    ({"resize_long": float("inf")}, "resize_long=inf is not a finite number"),
])
def test_parameters_that_can_only_give_nan_are_refused(params, message):
    from pearl.params import resolve
    with pytest.raises(ValueError, match=message):
        resolve(params)


def test_a_window_smaller_than_one_patch_is_refused(tiny_model, tokenizer):
    import pearl
    from pearl.errors import ConfigError
    with pytest.raises(ConfigError, match="slide_crop=8 is smaller than one 16-pixel patch"):
        pearl.Segmentor(tiny_model, ["cat"], tokenizer=tokenizer, slide_crop=8, slide_stride=4, text_cache_dir="")


@pytest.mark.parametrize("stage", ["last_block", "refinement"])
def test_nan_made_at_run_time_fails_the_job_naming_the_stage(synthetic, tmp_path, monkeypatch, stage):
    from pearl import runner
    from pearl import segmentor as segmentor_module
    from pearl.fused import OriginalSizeLogits
    from pearl.methods.pearl import Pearl
    from pearl.records import load_records
    if stage == "last_block":
        last_block = Pearl.last_block
        monkeypatch.setattr(Pearl, "last_block", lambda self, *args: last_block(self, *args) * float("nan"))
        expected = "NaN logits in method pearl's last block"
    else:
        refine = segmentor_module.Segmentor.refine
        monkeypatch.setattr(segmentor_module.Segmentor, "refine", lambda self, item, logits, info: (
            OriginalSizeLogits(refine(self, item, logits, info).source * float("nan"), logits.size, logits.dtype)))
        expected = "NaN logits in the refinement after fusion"
    cfg = compose(["model=tiny", f"data_root={synthetic}", f"results_dir={tmp_path}", "progress=false",
                   "loader_workers=0", "method=pearl"])
    with pytest.raises(evaluate_module.NumericalError, match=expected):
        runner.run_job(cfg)
    assert load_records(tmp_path) == []


def test_the_nan_window_warning_names_the_method():
    from pearl.segmentor import warn_nan_windows
    with pytest.warns(RuntimeWarning, match="3 of 10 windows produced NaN logits in method naclip's last block$"):
        warn_nan_windows(3, 10, "naclip")


@pytest.mark.parametrize(("arguments", "expected"), [
    (["tpl=true"], "unknown key 'tpl'; did you mean 'tlp'?"),
    (["method=pearl", "tlp_gird=40"], "unknown key 'tlp_gird'; did you mean 'tlp_grid'?"),
    (["dataset.imgs=/x"], "unknown key 'dataset.imgs'; did you mean 'images'?"),
    (["-m", "dataset=voc21,ade2k"], "dataset='ade2k' is not valid; did you mean 'ade20k'?"),
    (["method=nosuch"], "method='nosuch' is not valid; valid: cass, clearclip"),
    (["model=tinny"], "model='tinny' is not valid; did you mean 'tiny'?"),
    (["-m", "method=pearl,naclip", "+extra=1", "hydra.sweep.dir=x", "dataset.images=/x", "dataset=glob(*)",
      "model=vit_b16", "logger=wandb", "model=custom"], None),
])
def test_a_key_typo_on_the_command_line_says_did_you_mean(arguments, expected):
    from pearl.config import unknown_override
    problem = unknown_override(arguments)
    assert problem == expected if expected is None else problem.startswith(expected)


def test_folder_without_images_mps_without_mps_and_a_blank_class_line_are_one_line_errors(synthetic, tmp_path,
                                                                                       monkeypatch, capsys):
    from pearl import cli
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n\n")
    images = tmp_path / "images"
    images.mkdir()
    __import__("cv2").imwrite(str(images / "a.png"), __import__("numpy").zeros((32, 32, 3), "uint8"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(cli, "_outcomes", [])
    base = ["model=tiny", f"results_dir={tmp_path / 'res'}", "progress=false", "loader_workers=0"]
    cases = [(["dataset=folder"], "dataset=folder needs dataset.images and dataset.classes"),
             (["device=mps"], "device='mps' but this machine has no usable MPS"),
             (["dataset=folder", f"dataset.images={images}", f"dataset.classes={classes}"],
              "class 2 is an empty line")]
    for overrides, message in cases:
        assert cli.execute(compose(base + [f"data_root={synthetic}"] + overrides)) == "failed"
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "unexpected" not in err


def test_saved_predictions_of_sub_a_and_sub_underscore_a_are_two_files(tmp_path):
    import cv2
    import numpy as np
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    cv2.imwrite(str(images / "sub" / "a.png"), np.full((32, 48, 3), 40, np.uint8))
    cv2.imwrite(str(images / "sub_a.png"), np.full((32, 48, 3), 200, np.uint8))
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    _, record = runner.run_job(compose(["model=tiny", "dataset=folder", f"dataset.images={images}",
                                        f"dataset.classes={classes}", f"results_dir={tmp_path / 'res'}",
                                        "progress=false", "loader_workers=0"]))
    saved = sorted(p.relative_to(record.predictions_dir).as_posix()
                   for p in __import__("pathlib").Path(record.predictions_dir).rglob("*.png"))
    assert saved == ["sub/a_labels.png", "sub/a_overlay.png", "sub_a_labels.png", "sub_a_overlay.png"]


def test_an_unexpected_error_fails_its_job_in_one_line_with_the_traceback_beside_it(tmp_path, monkeypatch, capsys):
    from pearl import cli

    def broken(cfg, group=None):
        raise RuntimeError("index 7 is out of bounds\nsecond line")
    monkeypatch.setattr(runner, "run_job", broken)
    monkeypatch.setattr(cli, "_outcomes", [])
    monkeypatch.delenv("PEARL_TRACEBACK", raising=False)
    assert cli.execute(compose(["model=tiny"]), description="method=x", output_dir=str(tmp_path)) == "failed"
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"error: RuntimeError: index 7 is out of bounds (an unexpected error; traceback in "
                                f"{tmp_path / cli.TRACEBACK_FILE})"]
    assert "Traceback" in (tmp_path / cli.TRACEBACK_FILE).read_text() and cli.exit_code() == 1
    assert (tmp_path / cli.STATUS_FILE).read_text().startswith("failed\t[method=x] RuntimeError")
