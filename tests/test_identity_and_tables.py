"""Record identity, record validation, tables that select by identity, and the CLI's refusals."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pearl import cli, records, runner
from pearl import evaluate as evaluate_module
from pearl import plan as plan_module
from pearl.benchmarks import BENCHMARKS
from pearl.errors import MissingFileError
from pearl.records import RecordError, RunRecord, code_version, load_records, record_path
from pearl.tables import write_tables

from .conftest import REPO, compose

TINY = "tiny:seed0"


@pytest.fixture
def official_synthetic(monkeypatch):
    """Treat the synthetic splits as the official ones, so that their runs are full-split runs."""
    import dataclasses
    for name, size in (("voc21", 3), ("ade20k", 2)):
        monkeypatch.setitem(BENCHMARKS, name, dataclasses.replace(BENCHMARKS[name], official_size=size))


def _job(data_root, results, *extra):
    return ["model=tiny", f"data_root={data_root}", f"results_dir={results}", "progress=false", *extra]


def test_every_package_file_is_classified_as_computing_numbers_or_not():
    """A new module must be put into records.COMPUTES_NUMBERS (its edits make records stale) or
    COMPUTES_NO_NUMBER; none may be in both or neither."""
    from pearl.records import COMPUTES_NO_NUMBER, COMPUTES_NUMBERS, _listed, package_files
    for relative in package_files():
        places = [_listed(relative, COMPUTES_NUMBERS), _listed(relative, COMPUTES_NO_NUMBER)]
        assert places.count(True) == 1, f"pearl/{relative}: classify it in pearl/records.py"


def test_code_version_follows_the_computing_source_only(tmp_path):
    package = tmp_path / "pkg"
    shutil.copytree(REPO / "pearl", package, ignore=shutil.ignore_patterns("__pycache__"))
    first = code_version(package)
    code_version.cache_clear()
    assert code_version(package) == first  # unchanged code: same version
    (package / "__pycache__").mkdir(exist_ok=True)
    (package / "__pycache__" / "x.pyc").write_bytes(b"cache")
    for tool in ("tables.py", "attention.py", "sweep.py", "data/convert.py"):
        (package / tool).write_text((package / tool).read_text() + "\n# a change that computes no number\n")
    code_version.cache_clear()
    assert code_version(package) == first  # caches, reports, tools and glue do not count
    tlp = package / "refine" / "tlp.py"
    tlp.write_text(tlp.read_text() + "\n# changed\n")
    code_version.cache_clear()
    changed = code_version(package)
    assert changed != first
    protocol_file = package / "resources" / "protocols" / "pearl.yaml"
    protocol_file.write_text(protocol_file.read_text().replace("0.08", "0.09", 1))
    code_version.cache_clear()
    assert code_version(package) not in (first, changed)
    code_version.cache_clear()


def test_a_code_change_reruns_the_job_and_the_old_record_stays_as_history(synthetic, tmp_path, monkeypatch,
                                                                          official_synthetic):
    first = runner.run_job(compose(_job(synthetic, tmp_path)))
    assert first[0] == "ran" and runner.run_job(compose(_job(synthetic, tmp_path)))[0] == "skipped"
    monkeypatch.setattr(plan_module, "code_version", lambda: "0123456789abcdef")  # as after a commit to the package
    second = runner.run_job(compose(_job(synthetic, tmp_path)))
    assert second[0] == "ran" and second[1].config_hash != first[1].config_hash
    assert sorted(r.code_version for r in load_records(tmp_path)) == sorted([first[1].code_version,
                                                                             "0123456789abcdef"])
    # the table uses the current code's record; the older one fills only with --include-stale, marked
    write_tables(tmp_path, models=(TINY,), draw=False)
    row = pd.read_csv(tmp_path / "tiny_seed0" / "main.csv").set_index("row").loc["PEARL"]
    assert row["VOC21_record"] == first[1].config_hash and pd.isna(row["VOC21_flags"])
    monkeypatch.undo()


def test_identity_holds_what_made_the_number_and_not_operational_settings(synthetic, tmp_path):
    plan = plan_module.plan(compose(_job(synthetic, tmp_path)))
    same = [plan_module.plan(compose(_job(synthetic, tmp_path / "other", extra))).run_hash
            for extra in ("window_batch_size=2", "workers=2", "text_cache_dir=/tmp/elsewhere", "on_error=skip",
                          "progress=true", "device=cpu", "batch_images=1", "loader_workers=0", "diagnostics=true",
                          "save_predictions=1")]
    assert set(same) == {plan.run_hash}
    different = {plan_module.plan(compose(_job(synthetic, tmp_path, extra))).run_hash
                 for extra in ("tlp_grid=40", "max_images=2", "model.seed=1", "model.precision=bf16", "tlp=false",
                               "templates=single")}
    assert len(different) == 6 and plan.run_hash not in different
    identity = plan.identity
    assert identity["code_version"] == code_version() and identity["dataset"]["evaluated"] == 3
    assert len(identity["classes"]) == 21 and identity["templates"] and identity["model"]["seed"] == 0
    # a changed data file (same name, other size) changes the identity
    label = next((synthetic / BENCHMARKS["voc21"].label_dir).glob("*.png"))
    backup = label.read_bytes()
    label.write_bytes(backup + b"\0")
    try:
        assert plan_module.plan(compose(_job(synthetic, tmp_path))).run_hash != plan.run_hash
    finally:
        label.write_bytes(backup)


def test_checkpoint_files_are_identified_by_content(tmp_path):
    from omegaconf import OmegaConf
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    first.write_bytes(b"weights one")
    second.write_bytes(b"weights two")

    def identity(path):
        return plan_module.model_identity(OmegaConf.create({"name": "ViT-B-16", "pretrained": str(path)}), "fp32")
    one, two = identity(first), identity(second)
    assert one["file_sha256"] != two["file_sha256"] and one["label"] == "ViT-B-16:a.pt"
    tag = plan_module.model_identity(OmegaConf.create({"name": "ViT-B-16-quickgelu", "pretrained": "openai"}), "fp16")
    assert tag["label"] == records.DEFAULT_MODEL and tag["pretrained"] == "openai"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[]", b"{}", b'"text"'])
def test_unreadable_or_invalid_records_are_named_skipped_and_rerun(synthetic, tmp_path, content):
    record = runner.run(compose(_job(synthetic, tmp_path)))
    path = tmp_path / "runs" / f"{record.config_hash}.json"
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning, match=str(path.name)):
        assert load_records(tmp_path) == []
    assert (tmp_path / "runs" / "invalid" / path.name).read_bytes() == content and not path.exists()
    assert runner.run_job(compose(_job(synthetic, tmp_path)))[0] == "ran"
    assert json.loads(path.read_text())["mIoU"] == pytest.approx(record.mIoU)
    path.write_bytes(content)
    with pytest.warns(RuntimeWarning, match="runs again"):
        assert runner.run_job(compose(_job(synthetic, tmp_path)))[0] == "ran"  # found by the job itself


@pytest.mark.parametrize(("change", "reason"), [({"mIoU": "abc"}, "mIoU"), ({"mIoU": None}, "mIoU"),
                                                ({"image_count": 0}, "image_count"),
                                                ({"schema_version": 1}, "schema version 1"), ({"pa": "yes"}, "pa")])
def test_records_without_a_valid_metric_or_schema_are_not_finished_runs(synthetic, tmp_path, change, reason):
    record = runner.run(compose(_job(synthetic, tmp_path)))
    path = tmp_path / "runs" / f"{record.config_hash}.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    with pytest.warns(RuntimeWarning, match=reason):
        assert runner.run_job(compose(_job(synthetic, tmp_path)))[0] == "ran"


def _cell(results, table, row, column="VOC21_ours", model_folder="tiny_seed0"):
    return pd.read_csv(results / model_folder / f"{table}.csv").set_index("row").loc[row, column]


def test_tables_select_by_identity_not_recency(synthetic, tmp_path, official_synthetic):
    results = tmp_path / "res"
    default = runner.run(compose(_job(synthetic, results)))
    assert default.full_split
    write_tables(results, models=(TINY,), draw=False)
    before = pd.read_csv(results / "tiny_seed0" / "main.csv")
    assert _cell(results, "main", "PEARL") == round(default.mIoU, 2)
    # PEARL's VOC protocol is resize_short=336: the same run is also Table 5's 336 row
    assert _cell(results, "resolution", "short side 336") == round(default.mIoU, 2)
    assert pd.isna(_cell(results, "resolution", "short side 224"))

    partial = runner.run(compose(_job(synthetic, results, "max_images=1")))
    grid = runner.run(compose(_job(synthetic, results, "tlp_grid=40")))
    other_model = runner.run(compose(_job(synthetic, results, "model.seed=1")))
    explicit = runner.run_job(compose(_job(synthetic, results, "resize_short=336")))
    small = runner.run(compose(_job(synthetic, results, "resize_short=224")))
    assert explicit[0] == "skipped" and explicit[1].config_hash == default.config_hash
    assert not partial.full_split and {grid.mIoU, other_model.mIoU, partial.mIoU} != {default.mIoU}

    write_tables(results, models=(TINY, "tiny:seed1"), draw=False)
    after = pd.read_csv(results / "tiny_seed0" / "main.csv")
    pd.testing.assert_frame_equal(before, after)  # newer partial / other-model / other-param runs: no effect
    assert _cell(results, "resolution", "short side 224") == round(small.mIoU, 2)
    assert _cell(results, "resolution", "short side 336") == round(default.mIoU, 2)
    assert _cell(results, "main", "PEARL", model_folder="tiny_seed1") == round(other_model.mIoU, 2)
    backbones = pd.read_csv(results / "backbones.csv").set_index("row")
    assert backbones.loc["PEARL tiny:seed0", "VOC21_ours"] == round(default.mIoU, 2)
    assert backbones.loc["PEARL tiny:seed1", "VOC21_ours"] == round(other_model.mIoU, 2)
    assert pd.isna(backbones.loc["PEARL ViT-B/16", "VOC21_ours"])  # Table 6's rows stay, run or not
    assert backbones.loc["PEARL ViT-B/16", "paper_source"] == "table6: PEARL ViT-B/16"
    # the runs with other settings (tlp_grid, resize_short) name no row of their own
    assert list(backbones.index) == ["PEARL ViT-B/32", "PEARL ViT-B/16", "PEARL ViT-L/14", "PEARL tiny:seed0",
                                     "PEARL tiny:seed1"]
    naclip = runner.run(compose(_job(synthetic, results, "method=naclip", "model.seed=1")))
    write_tables(results, models=(TINY,), draw=False)
    by_model = pd.read_csv(results / "backbones_by_model.csv").set_index("method")
    assert list(by_model.index) == ["pearl", "naclip"]  # the method × backbone table: a row per method
    assert by_model.loc["naclip", "tiny:seed1 VOC21"] == round(naclip.mIoU, 2)
    assert pd.isna(by_model.loc["naclip", "tiny:seed0 VOC21"])  # no naclip run of that model
    assert by_model.loc["pearl", "tiny:seed0 VOC21"] == round(default.mIoU, 2)
    assert pd.isna(by_model.loc["pearl", "ViT-B-16:openai VOC21"])
    assert "naclip tiny:seed1" in set(pd.read_csv(results / "backbones.csv")["row"])

    # partial runs fill only on request, marked
    write_tables(results, models=(TINY,), include_partial=True, draw=False)
    assert _cell(results, "main", "PEARL", "VOC21_flags") == "of 2"  # the full run still wins over the partial one
    assert _cell(results, "main", "PEARL") == round(default.mIoU, 2)

    write_tables(results, models=(TINY,), pivots=("tlp_grid",), draw=False)
    pivot = pd.read_csv(results / "tiny_seed0" / "pivot_tlp_grid.csv")
    pearl_rows = pivot[(pivot.method == "pearl") & pivot.pa & pivot.tlp].set_index("tlp_grid")
    assert pearl_rows.loc[40, "VOC21"] == round(grid.mIoU, 2) and pearl_rows.loc[80, "VOC21"] == round(default.mIoU, 2)
    assert 224 not in pearl_rows.index  # a resize run is not a tlp_grid point
    assert list(pearl_rows.index) == [40, 80]  # numeric order
    with pytest.raises(ValueError, match="tlp_gird"):
        write_tables(results, models=(TINY,), pivots=("tlp_gird",))


def test_grid_figure_from_the_pivot(synthetic, tmp_path, official_synthetic):
    from PIL import Image

    from pearl.tables import Selection, grid_points
    results = tmp_path / "res"
    runs = {grid: runner.run(compose(_job(synthetic, results, "dataset=ade20k", f"tlp_grid={grid}")))
            for grid in (40, 80, 160)}
    runner.run(compose(_job(synthetic, results, "dataset=ade20k", "resize_short=224")))
    points, flags = grid_points(load_records(results), Selection(TINY))
    assert points[["tlp_grid", "mIoU"]].values.tolist() == [[g, round(r.mIoU, 2)] for g, r in runs.items()]
    assert flags == []
    write_tables(results, models=(TINY,))
    figure = Image.open(results / "tiny_seed0" / "figures" / "fig4_tlp_grid.png")
    assert "random weights: smoke figure" in figure.text["Title"] and figure.size[0] > 100
    drawn = pd.read_csv(results / "tiny_seed0" / "figures" / "fig4_tlp_grid.csv")
    assert drawn["mIoU"].tolist() == [round(r.mIoU, 2) for r in runs.values()]


def test_figures_show_the_tables_cells_and_say_where_they_come_from(synthetic, tmp_path, official_synthetic):
    from PIL import Image

    from pearl.figures import ablation_cells, bar_data
    results = tmp_path / "res"
    pearl_run = runner.run(compose(_job(synthetic, results)))
    pa_only = runner.run(compose(_job(synthetic, results, "tlp=false")))
    partial = runner.run(compose(_job(synthetic, results, "method=naclip", "max_images=1")))
    written, _ = write_tables(results, models=(TINY,), include_partial=True)
    figures = results / "tiny_seed0" / "figures"
    assert {p.name for p in figures.glob("*.png")} == {f"{n}{s}.png" for n in ("main", "ablation", "plug_and_play",
                                                                                "resolution", "code_vs_paper")
                                                        for s in ("", "_pacc")
                                                       } | {"ablation_pa_tlp.png"}  # one tlp_grid: no Fig. 4
    assert (results / "figures" / "backbones.png").is_file() and written["tiny:seed0/figures/main"].is_file()
    main = pd.read_csv(results / "tiny_seed0" / "main.csv")
    bars = bar_data(main).set_index(["row", "column"])
    assert bars.loc[("PEARL", "VOC21"), "ours"] == round(pearl_run.mIoU, 2)
    assert bars.loc[("NACLIP (no PAMR)", "VOC21"), "ours"] == round(partial.mIoU, 2)
    paper = load_paper_value("table1", "PEARL (Ours)", "voc21")
    assert bars.loc[("PEARL", "VOC21"), "paper"] == paper
    assert bars.loc[("PEARL", "VOC21"), "diff"] == pytest.approx(round(pearl_run.mIoU, 2) - paper, abs=0.011)
    assert np.isnan(bars.loc[("PEARL", "ADE"), "ours"])  # no run: an empty bar, never a zero value
    title = Image.open(figures / "main.png").text["Title"]
    assert "random weights: smoke figure" in title and "includes partial-split runs" in title
    ablation = pd.read_csv(results / "tiny_seed0" / "ablation.csv")
    assert ablation_cells(ablation) == {(False, False): "Vanilla CLIP (full block)", (True, False): "PA only",
                                        (False, True): "TLP only (reduced block)", (True, True): "PA + TLP (PEARL)"}
    assert ablation.set_index("row").loc["PA only", "VOC21_ours"] == round(pa_only.mIoU, 2)
    assert "partial" not in Image.open(figures / "ablation_pa_tlp.png").text["Title"]  # its cells are full runs
    write_tables(results, models=(TINY,), draw=False, out_dir=tmp_path / "plain")
    assert not (tmp_path / "plain" / "tiny_seed0" / "figures").exists()


def load_paper_value(table: str, row: str, dataset: str) -> float:
    """The paper's number as results/paper/*.csv states it (read here with pandas, not pearl.tables)."""
    frames = pd.concat([pd.read_csv(p) for p in (REPO / "results" / "paper").glob("*.csv")])
    hit = frames[(frames.table == table) & (frames.row == row) & (frames.dataset == dataset)]
    return float(hit.iloc[0]["value"])


@pytest.mark.slow  # a subprocess of run.py / pearl.tables
def test_tables_on_an_empty_results_folder_fail_and_write_nothing(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pearl.tables", "--results", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "no result records" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "none").exists() and list(tmp_path.iterdir()) == []


BAD = [("on_error=skpi", "on_error"), ("+tlp_gird=40", "tlp_gird"), ("device=gpu", "device"),
       ("workers=0", "workers"), ("max_images=0", "max_images"), ("max_images=-1", "max_images"),
       ("pa=maybe", "pa"), ("tlp=1", "tlp"), ("force=yes", "force"), ("profile=bogus", "profile"),
       ("alpha_kk=abc", "alpha_kk"), ("tlp_pool=foo", "tlp_pool"), ("resize_short=-1", "resize_short"),
       ("tlp_grid=4.5", "tlp_grid"), ("model.precision=fp8", "model.precision"), ("+model.foo=1", "model.foo"),
       ("+dataset.extra=1", "dataset.extra"), ("window_batch_size=0", "window_batch_size"),
       # values that can only give NaN (the rules in pearl/params.py: finite numbers, temperatures > 0, TLP's
       # system positive definite)
       ("tlp_tau_s=0", "tlp_tau_s"), ("tlp_tau_s=nan", "tlp_tau_s"), ("resize_short=inf", "resize_short"),
       ("logit_scale=inf", "logit_scale"), ("tlp_eps=0", "tlp_eps"), ("tlp_tau=-1", "tlp_tau"),
       ("alpha_kk=nan", "alpha_kk"), ("group_memory_gib=0", "group_memory_gib")]
if not __import__("torch").cuda.is_available():
    BAD.append(("device=cuda", "device"))


@pytest.mark.parametrize(("override", "key"), BAD)
def test_invalid_keys_and_values_fail_in_one_line_before_any_model(synthetic, tmp_path, monkeypatch, capsys, override,
                                                                   key):
    built = []
    monkeypatch.setattr(evaluate_module, "build_model", lambda *args: built.append(args))
    monkeypatch.delenv("PEARL_TRACEBACK", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    status = cli.execute(compose(_job(synthetic, tmp_path, override)), description=override)
    err = capsys.readouterr().err.strip()
    assert status == "failed" and built == [] and cli.exit_code() == 1
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and key in err
    value = override.split("=", 1)[1]
    assert value in err or key.startswith(("model.", "dataset.", "tlp_gird"))
    cli._outcomes.clear()


def test_pa_for_a_method_without_query_key_fails_before_loading(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module, "build_model", lambda *args: pytest.fail("a model was built"))
    with pytest.raises(ValueError, match="query·key"):
        runner.run(compose(_job(synthetic, tmp_path, "method=naclip", "pa=true")))


def test_traceback_switch_raises_the_error(synthetic, tmp_path, monkeypatch):
    monkeypatch.setenv("PEARL_TRACEBACK", "1")
    from pearl.errors import ConfigError
    with pytest.raises(ConfigError, match="on_error"):
        cli.execute(compose(_job(synthetic, tmp_path, "on_error=skpi")))
    cli._outcomes.clear()


@pytest.mark.slow  # a subprocess of run.py / pearl.tables
def test_help_lists_every_key_with_its_meaning():
    out = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    import pearl
    from pearl.config import RUN_KEYS
    for name, spec in list(RUN_KEYS.items()) + list(pearl.PARAMS.items()):
        assert f"  {name} (default " in out.stdout and spec.meaning in out.stdout, name


@pytest.mark.slow  # a subprocess of run.py / pearl.tables
def test_smoke_recipe_writes_its_tables_where_it_was_told(tmp_path):
    results = tmp_path / "smoke-results"
    out = subprocess.run(["bash", str(REPO / "experiments" / "smoke.sh"), f"results_dir={results}",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}", "progress=false"], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                                         "WANDB_MODE": "disabled", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (results / "tiny_seed0" / "main.csv").is_file() and (results / "backbones.csv").is_file()


def test_a_folder_without_masks_is_a_prediction_run(tmp_path, photos):
    from PIL import Image

    from pearl.records import read_record
    (tmp_path / "img").mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(photos[name]).save(tmp_path / "img" / f"{name}.png")
    (tmp_path / "classes.txt").write_text("cat\nsky\ncup, mug\n")
    cfg = compose(["model=tiny", "dataset=folder", f"dataset.images={tmp_path / 'img'}", "progress=false",
                   f"dataset.classes={tmp_path / 'classes.txt'}", f"results_dir={tmp_path / 'res'}"])
    status, record = runner.run_job(cfg)
    assert status == "ran" and record.ground_truth is False and record.image_count == 2
    assert record.mIoU is None and record.aAcc is None and record.per_class_iou == []  # no NaN metric rows
    assert read_record(record_path(tmp_path / "res", record.config_hash)).ground_truth is False
    folder = Path(record.predictions_dir)  # every image's prediction, beside the record
    assert folder == evaluate_module.predictions_folder(tmp_path / "res", record.config_hash)
    for name in ("chelsea", "coffee"):
        labels = np.asarray(Image.open(folder / f"{name}_labels.png"))
        assert labels.shape == photos[name].shape[:2] and labels.max() < 3
        overlay = Image.open(folder / f"{name}_overlay.png")  # the image, and the random model's note beneath
        assert overlay.width == photos[name].shape[1] and overlay.height > photos[name].shape[0]
        assert "random weights" in overlay.text["note"]
    with pytest.raises(RecordError, match="holds metrics"):
        RunRecord.from_dict(record.to_dict() | {"mIoU": 12.0})


def test_save_predictions_writes_the_first_n_beside_the_record(synthetic, tmp_path):
    record = runner.run(compose(_job(synthetic, tmp_path, "save_predictions=2")))
    assert record.ground_truth and record.mIoU is not None
    written = sorted(p.name for p in Path(record.predictions_dir).iterdir())
    assert len(written) == 4 and all(name.endswith(("_labels.png", "_overlay.png")) for name in written)
    other = runner.run(compose(_job(synthetic, tmp_path / "none")))
    assert other.predictions_dir is None and other.config_hash == record.config_hash  # not in the identity


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unwritable_results_dir_fails_before_any_model(synthetic, tmp_path, monkeypatch, capsys, where):
    monkeypatch.setattr(evaluate_module, "build_model", lambda *args: pytest.fail("a model was built"))
    target = tmp_path / "a-file" if where == "file" else Path("/proc/pearl-results")
    if where == "file":
        target.write_text("not a folder")
    assert cli.execute(compose(_job(synthetic, target))) == "failed"
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(target) in err and "writable" in err
    cli._outcomes.clear()


def test_stale_temporary_records_of_dead_writers_are_removed(tmp_path):
    import os
    import socket
    import time
    runs = tmp_path / "runs"
    runs.mkdir()
    host = socket.gethostname().replace(".", "_")
    dead = runs / f".abc.json.{host}.999999999.tmp"  # no such process on this host
    alive = runs / f".abc.json.{host}.{os.getpid()}.tmp"
    other_host = runs / ".abc.json.node7.999999999.tmp"  # another node's writer, maybe still writing
    old = runs / ".def.json.node7.12.tmp"
    for path in (dead, alive, other_host, old):
        path.write_text("{")
    day_ago = time.time() - records.ABANDONED_AFTER_S - 60
    os.utime(old, (day_ago, day_ago))
    records.prepare_results_dir(tmp_path)
    assert not dead.exists() and alive.exists() and other_host.exists() and not old.exists()


@pytest.mark.parametrize(("damage", "reason"), [
    ("renamed", "copied or renamed"), ("identity", "identity hashes to"), ("params", "params is empty"),
    ("finished_null", "finished_at is None"), ("finished_text", "not an ISO 8601 time"),
    ("unreadable", "cannot be read")])
def test_records_are_checked_not_trusted_by_name(synthetic, tmp_path, monkeypatch, damage, reason):
    from pathlib import Path
    record = runner.run(compose(_job(synthetic, tmp_path)))
    path = tmp_path / "runs" / f"{record.config_hash}.json"
    data = json.loads(path.read_text())
    if damage == "renamed":
        path.rename(path.with_name("0123456789abcdef.json"))
        path = path.with_name("0123456789abcdef.json")
    elif damage == "identity":
        data["identity"]["method"] = "naclip"  # a hand-edited identity under the old name
    elif damage == "params":
        data["params"] = {}
    elif damage in ("finished_null", "finished_text"):
        data["finished_at"] = None if damage == "finished_null" else "yesterday"
    if damage not in ("renamed", "unreadable"):
        path.write_text(json.dumps(data))
    if damage == "unreadable":  # root reads any mode: the denial as the file system gives it
        read_text = Path.read_text
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(
            13, "Permission denied")) if self == path else read_text(self, *a, **k))
    with pytest.warns(RuntimeWarning, match=reason):
        assert load_records(tmp_path) == []
    assert (tmp_path / "runs" / "invalid" / path.name).exists()


def test_the_newest_record_is_found_by_time_and_a_whole_split_before_a_subset(synthetic, tmp_path):
    import dataclasses

    from pearl.tables import Selection, choose
    record = runner.run(compose(_job(synthetic, tmp_path)))
    selection = Selection(record.model_label)
    selection = dataclasses.replace(selection, code=record.code_version, include_partial=True)
    east = dataclasses.replace(record, finished_at="2026-01-01T10:00:00+05:00")  # 05:00 UTC
    west = dataclasses.replace(record, finished_at="2026-01-01T06:00:00+00:00")  # 06:00 UTC: newer
    assert choose([east, west], selection).record is west
    whole = dataclasses.replace(record, full_split=False, image_count=3, dataset_size=3,
                                finished_at="2026-01-01T00:00:00+00:00")
    subset = dataclasses.replace(whole, image_count=1, max_images=1, finished_at="2026-06-01T00:00:00+00:00")
    assert choose([subset, whole], selection).record is whole


@pytest.mark.slow  # a subprocess of run.py / pearl.tables
def test_names_never_become_paths_outside_their_folders(synthetic, tmp_path):
    import dataclasses
    import subprocess
    import sys

    from pearl.records import path_component, record_path, write_record
    assert path_component("../..") == "___.." and path_component("..") == "__" and path_component("") == "_"
    assert path_component("ViT-B-16:openai") == "ViT-B-16_openai" and path_component(".hidden") == "_hidden"
    record = runner.run(compose(_job(synthetic, tmp_path / "res")))
    with pytest.raises(ValueError, match="not a plain name"):
        write_record(tmp_path / "res", dataclasses.replace(record, config_hash="../../evil"))
    with pytest.raises(ValueError, match="not a plain name"):
        record_path(tmp_path, "a/b")
    sweep = tmp_path / "sweep"
    subprocess.run([sys.executable, "run.py", "-m", "model=tiny", "dataset.name=../..", f"hydra.sweep.dir={sweep}"],
                   cwd=REPO, capture_output=True, timeout=120)
    (job_folder,) = [p for p in sweep.iterdir() if p.is_dir()]
    assert job_folder.name == "0_pearl_.._.._paNone_tlpNone" and not (tmp_path / ".hydra").exists()


def test_a_write_that_fails_midway_leaves_the_previous_record_whole(synthetic, tmp_path, monkeypatch):
    import dataclasses
    import os

    from pearl.records import read_record, write_record
    record = runner.run(compose(_job(synthetic, tmp_path)))
    path = tmp_path / "runs" / f"{record.config_hash}.json"
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the new content was written somewhere
    with pytest.raises(OSError, match="No space"):
        write_record(tmp_path, dataclasses.replace(record, mIoU=1.0))
    assert path.read_bytes() == before and read_record(path).mIoU == record.mIoU
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [path.name]  # no temporary file left


def test_among_equally_good_records_the_newest_fills_the_cell(tmp_path, official_synthetic):
    from pearl.data.synthetic import write_dataset
    data = write_dataset("voc21", tmp_path / "data", num_images=3, size=(48, 64))
    results = tmp_path / "res"
    older = runner.run(compose(_job(data, results)))
    label = next((data / BENCHMARKS["voc21"].label_dir).glob("*.png"))
    from PIL import Image
    relabelled = Image.open(label)
    Image.fromarray((np.array(relabelled) == 0).astype(np.uint8)).save(label)  # re-converted data: new identity
    newer = runner.run(compose(_job(data, results)))
    assert newer.config_hash != older.config_hash and newer.mIoU != older.mIoU
    write_tables(results, models=(TINY,), draw=False)
    assert _cell(results, "main", "PEARL") == round(newer.mIoU, 2)
    assert _cell(results, "main", "PEARL", "VOC21_record") == newer.config_hash
    assert _cell(results, "main", "PEARL", "VOC21_flags") == "of 2"


def test_an_extra_dataset_runs_and_gets_a_column_without_paper_values(tmp_path, monkeypatch):
    import dataclasses

    from PIL import Image

    from pearl.data.synthetic import write_dataset
    root = write_dataset("context459", tmp_path / "data", num_images=2, size=(32, 48))
    label_dir = root / BENCHMARKS["context459"].label_dir
    first = label_dir / "2008_000000.tif"
    label = np.array(Image.open(first))
    label[:8] = 65535  # ignored rows: the record's pixel count says whether they were dropped
    Image.fromarray(label).save(first)
    monkeypatch.setitem(BENCHMARKS, "context459", dataclasses.replace(BENCHMARKS["context459"], official_size=2))
    results = tmp_path / "res"
    record = runner.run(compose(["model=tiny", "method=vanilla", "dataset=context459", f"data_root={root}",
                                 f"results_dir={results}", "progress=false", "device=cpu"]))
    assert record.dataset == "context459" and record.image_count == 2 and record.full_split
    assert len(record.per_class_iou) == 459 and record.per_class_iou[458]["class"] == "wool"
    seen = sorted({int(v) for f in label_dir.glob("*.tif") for v in np.unique(np.array(Image.open(f)))} - {65535})
    assert all(record.per_class_iou[k]["iou"] is not None for k in seen)  # every class in the ground truth scored
    write_tables(results, models=(TINY,), draw=False)
    main = pd.read_csv(results / "tiny_seed0" / "main.csv").set_index("row")
    assert main.loc["CLIP", "PC459_ours"] == round(record.mIoU, 2)
    assert pd.isna(main.loc["CLIP", "PC459_paper"]) and pd.isna(main.loc["CLIP", "PC459_diff"])
    assert pd.isna(main.loc["CLIP", "Avg_ours"]) and "PC459" not in main.loc["CLIP", "missing"]
    assert list(main.columns).index("PC459_ours") > list(main.columns).index("Avg_ours")
    assert "ADE-847_ours" not in main.columns  # no records of it: no column
    header = (results / "tiny_seed0" / "main.md").read_text().splitlines()[2]
    assert "| Avg | PC459 | missing |" in header


def test_code_vs_paper_rows_are_each_paper_variant_then_all(synthetic, tmp_path, official_synthetic):
    from pearl.params import code_vs_paper_runs
    # docs/pearl.md §6, the variants for which the paper states a value (not tlp_softmax_temp, tlp_cg_iters)
    paper = {"slide_crop": 224, "arch": "vanilla", "use_kk": False, "pa_solver": "svd", "tlp_site": "per_window",
             "tlp_pool": "adaptive", "tlp_quadform": "full", "tlp_grad_norm": "none", "tlp_edge_clamp": False}
    runs = code_vs_paper_runs()
    assert runs[0] == ("released code", {}) and runs[-1] == ("all paper variants", paper)
    assert dict(item for _, overrides in runs[1:-1] for item in overrides.items()) == paper
    assert all(len(overrides) == 1 for _, overrides in runs[1:-1])
    listed = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-m", "pearl.params", "--code-vs-paper"],
                            capture_output=True, text=True, check=True, cwd=REPO).stdout.splitlines()
    assert listed[0] == "" and listed[4] == "pa_solver=svd" and listed[-1].startswith("slide_crop=224 arch=vanilla")

    results = tmp_path / "res"
    released = runner.run(compose(_job(synthetic, results, "dataset=ade20k")))
    svd = runner.run(compose(_job(synthetic, results, "dataset=ade20k", "pa_solver=svd")))
    whole_voc = runner.run(compose(_job(synthetic, results)))
    write_tables(results, models=(TINY,), draw=False)
    table = pd.read_csv(results / "tiny_seed0" / "code_vs_paper.csv").set_index("row")
    assert list(table.index) == [title for title, _ in runs]
    assert table.loc["pa_solver=svd", "ADE_ours"] == round(svd.mIoU, 2)
    assert table.loc["pa_solver=svd", "ADE_delta"] == pytest.approx(round(svd.mIoU, 2) - round(released.mIoU, 2),
                                                                      abs=1e-9)
    assert table.loc["released code", "ADE_delta"] == 0
    # ADE20K is evaluated in 224 windows anyway: the paper's window variant is the released run there
    assert table.loc["slide_crop=224", "ADE_record"] == released.config_hash
    assert table.loc["slide_crop=224", "ADE_delta"] == 0
    assert pd.isna(table.loc["slide_crop=224", "VOC21_ours"])  # on VOC it is another run (not made here)
    assert table.loc["released code", "VOC21_ours"] == round(whole_voc.mIoU, 2)
    assert table.loc["released code", "VOC21_paper"] == 64.1  # beside the paper's Table 1 PEARL numbers
    markdown = (results / "tiny_seed0" / "code_vs_paper.md").read_text()
    assert f"Δ{table.loc['pa_solver=svd', 'ADE_delta']:+.2f}" in markdown and "released-code row" in markdown


def test_backbones_made_from_random_weights_say_so(synthetic, tmp_path, official_synthetic):
    from PIL import Image
    results = tmp_path / "res"
    runner.run(compose(_job(synthetic, results)))  # PEARL with PA and TLP: a Table 6 row of model tiny
    written, _ = write_tables(results, models=(TINY,))
    assert "Rows of model tiny: smoke figures of a randomly initialised network" in written["backbones"].with_suffix(
        ".md").read_text()
    assert "random weights" in Image.open(written["figures/backbones"]).text["Title"]


def test_tables_of_partial_runs_only_say_why_they_are_empty(synthetic, tmp_path):
    import dataclasses

    from pearl.tables import why_cells_are_empty
    record = runner.run(compose(_job(synthetic, tmp_path, "max_images=2")))
    assert not record.full_split
    line = why_cells_are_empty([record], [TINY], include_partial=False, include_stale=False)
    assert line.startswith("the tables have no cell: of the 1 record(s)") and "1 are partial" in line
    assert "--include-partial" in line
    assert why_cells_are_empty([record], [TINY], include_partial=True, include_stale=False) == ""
    stale = dataclasses.replace(record, code_version="0" * 16, full_split=True)
    assert "1 were made by older code: --include-stale" in why_cells_are_empty([stale], [TINY], False, False)


def test_a_proxyclip_row_takes_only_the_records_of_its_vfm(synthetic, tmp_path, capsys):
    """PEARL's Table 1 ran ProxyCLIP with DINOv2 B/14 (registers), its code defaults to DINO B/8: each
    row is filled only by records whose model identity names its vision model."""
    from pearl.tables import MAIN, Selection, candidates
    record = runner.run(compose(_job(synthetic, tmp_path / "res", "method=proxyclip")))
    assert record.model["vfm"] == "tiny:random"  # beside the tiny CLIP: the tiny vision model

    def ran_with(label: str) -> RunRecord:
        return RunRecord.from_dict({**record.to_dict(), "model": {**record.model, "vfm": label}})
    dinov2, dino = ran_with("dinov2_b14_reg:hub"), ran_with("dino_b8:dino_vitbase8_pretrain.pth@0123456789abcdef")
    rows = {row.vfm: row for row in MAIN if row.method == "proxyclip"}
    assert rows["dinov2_b14_reg"].paper_row == "ProxyCLIP" and rows["dino_b8"].paper_row is None
    selection = Selection(model=TINY, include_partial=True)
    assert candidates([record, dinov2, dino], rows["dinov2_b14_reg"], "voc21", selection) == [dinov2]
    assert candidates([record, dinov2, dino], rows["dino_b8"], "voc21", selection) == [dino]
    again = runner.run_job(compose(_job(synthetic, tmp_path / "res", "method=proxyclip", "vfm=dino_b16",
                                        "vfm.pretrained=null", "dry_run=true")))
    assert again[0] == "dry_run"  # another vision model: another job, not this record
    assert "vfm dino_b16:random (weights random)" in capsys.readouterr().out
    planned = plan_module.plan(compose(_job(synthetic, tmp_path / "res", "method=proxyclip", "vfm=dino_b16",
                                            "vfm.pretrained=null")))
    assert planned.model["vfm"] == "dino_b16:random" and planned.run_hash != record.config_hash
    with pytest.raises(MissingFileError, match="vfm.pretrained='/no/dino.pth' does not exist"):  # before any model
        plan_module.plan(compose(_job(synthetic, tmp_path / "res", "method=proxyclip", "vfm=dino_b8",
                                      "vfm.pretrained=/no/dino.pth")))


def test_lposs_rows_take_the_records_of_its_own_clip_and_the_papers_cells_sit_beside_lposs_plus(synthetic,
                                                                                              tmp_path):
    """LPOSS's code runs OpenCLIP's LAION-2B ViT-B/16: its rows take only records of that model (and of DINO
    B/16), whatever model the table is for; PEARL's Table 1 "LPOSS" numbers (its paper's LPOSS+) sit beside
    the lposs_plus=true row, none beside the patch-only row. +experiment=lposs sets that model."""
    from pearl.tables import MAIN, Selection, build_table, candidates, load_paper
    experiment = compose(["+experiment=lposs"])
    assert (experiment.model.name, experiment.model.pretrained, experiment.model.precision) == (
        "ViT-B-16", "laion2b_s34b_b88k", "auto")  # auto: fp32 for LPOSS on a GPU, as upstream
    record = runner.run(compose(_job(synthetic, tmp_path / "res", "method=lposs")))
    assert record.model["vfm"] == "tiny:random" and record.params["lposs_plus"] is False
    # the same record as if made by LPOSS+ on LPOSS's own models (LPOSS+ itself: tests/test_propagation.py)
    laion = RunRecord.from_dict({**record.to_dict(), "params": {**record.params, "lposs_plus": True},
                                 "model": {**record.model, "label": "ViT-B-16:laion2b_s34b_b88k",
                                           "vfm": "dino_b16:hub"}})
    rows = {row.title: row for row in MAIN if row.method == "lposs"}
    plus, patches = rows["LPOSS+ (LAION-2B B/16, DINO B/16)"], rows["LPOSS (LAION-2B B/16, DINO B/16)"]
    assert (plus.paper_table, plus.paper_row, patches.paper_row) == ("table1", "LPOSS", None)
    selection = Selection(include_partial=True)  # the table of OpenAI's ViT-B/16
    assert candidates([record, laion], plus, "voc21", selection) == [laion]
    assert candidates([record, laion], patches, "voc21", selection) == []  # another setting: lposs_plus
    main = build_table([laion], load_paper(REPO / "results" / "paper"), MAIN, selection=selection).set_index("row")
    assert main.loc[plus.title, "VOC21_paper"] == 61.1 and main.loc[plus.title, "model"] == "ViT-B-16:laion2b_s34b_b88k"
    assert pd.isna(main.loc[patches.title, "VOC21_paper"])


def test_cass_runs_its_released_configs_and_its_rows_take_the_records_of_their_vfm(synthetic, tmp_path):
    """CASS's configs (configs/cfg_*.py): VOC21 whole-image with prob_thd 0.1 and weights 0.1 / 0.03 / 0.10;
    Cityscapes at 560 with its windows reading their own CLS and, as VOC20, no singular-value stretch.
    PEARL's Table 1 ran it with DINOv2 B/14 (registers) and DINOv3 B/16: each row takes only the records
    of its vision model."""
    from pearl.protocols import protocol
    from pearl.tables import MAIN, Selection, candidates
    voc = protocol("cass", "voc21")
    assert (voc["slide_crop"], voc["prob_thd"], voc["logit_scale"]) == (0, 0.1, 40)
    assert (voc["cass_global_weight"], voc["cass_mean_vector_weight"], voc["cass_h_threshold"]) == (0.1, 0.03, 0.10)
    city = protocol("cass", "cityscapes")
    assert (city["resize_short"], city["cass_global_embedding"], city["cass_rescale_singular_values"]) == (
        560, "window", False)
    assert protocol("cass", "voc20")["cass_rescale_singular_values"] is False
    assert "cass_rescale_singular_values" not in protocol("cass", "ade20k")
    record = runner.run(compose(_job(synthetic, tmp_path / "res", "method=cass")))
    assert record.model["vfm"] == "tiny:random" and record.params["cass_low_rank"] == "randomized"

    def ran_with(label: str) -> RunRecord:
        return RunRecord.from_dict({**record.to_dict(), "model": {**record.model, "vfm": label}})
    dinov2, dinov3, dino = ran_with("dinov2_b14_reg:hub"), ran_with("dinov3_b16:hub"), ran_with("dino_b8:hub")
    rows = {row.vfm: row for row in MAIN if row.method == "cass"}
    assert (rows["dinov2_b14_reg"].paper_row, rows["dinov3_b16"].paper_row, rows["dino_b8"].paper_row) == (
        "CASS (DINOv2)", "CASS (DINOv3)", None)
    selection = Selection(model=TINY, include_partial=True)
    for name, made in (("dinov2_b14_reg", dinov2), ("dinov3_b16", dinov3), ("dino_b8", dino)):
        assert candidates([record, dinov2, dinov3, dino], rows[name], "voc21", selection) == [made]


def test_glaclip_runs_its_released_configs():
    """GLA-CLIP's configs (configs/cfg_*.py, cfg.py's defaults): 224/112 windows everywhere, short side 336 but
    560 on Cityscapes, prob_thd 0.1 on VOC21, PC60 and COCO-Object; the base class files."""
    from pearl.protocols import class_file, protocol
    voc = protocol("glaclip", "voc21")
    assert (voc["resize_short"], voc["slide_crop"], voc["slide_stride"], voc["logit_scale"], voc["prob_thd"]) == (
        336, 224, 112, 40, 0.1)
    assert protocol("glaclip", "cityscapes")["resize_short"] == 560
    assert [protocol("glaclip", name)["prob_thd"] for name in ("context60", "coco_object", "voc20", "ade20k")] == [
        0.1, 0.1, 0.0, 0.0]
    assert class_file("voc21", "glaclip").name == "voc21.txt"


def test_auto_precision_is_what_each_method_s_released_code_runs():
    """LPOSS's released code keeps OpenCLIP and DINO in fp32 on a GPU; the others run fp16 there; the
    CPU runs fp32; an explicit precision is kept."""
    import torch

    from pearl.plan import resolved_precision
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolved_precision("auto", cuda, "lposs") == "fp32"
    assert resolved_precision("auto", cuda, "naclip") == "fp16" == resolved_precision("auto", cuda, "proxyclip")
    assert resolved_precision("auto", cpu, "naclip") == "fp32"
    assert resolved_precision("fp16", cuda, "lposs") == "fp16"
