"""Jobs of one sweep that share blocks 1..L−1 are evaluated in one pass, each writing the record it
writes alone (docs/speed.md §3)."""
import subprocess
import sys

import pytest

from pearl import cli, runner, sweep
from pearl import evaluate as evaluate_module
from pearl import plan as plan_module
from pearl import segmentor as segmentor_module
from pearl.locks import try_lock
from pearl.records import record_path

from .conftest import REPO, compose

PEARL_SWEEP = [["method=pearl", f"pa={pa}", f"tlp={tlp}"] for pa in ("true", "false") for tlp in ("true", "false")]


def _cfgs(synthetic, results, jobs):
    return [compose(["model=tiny", f"data_root={synthetic}", f"results_dir={results}", "progress=false",
                     "loader_workers=0", *job]) for job in jobs]


def _trunk_calls(monkeypatch):
    from pearl.towers.base import Tower
    calls = []
    original = Tower.trunk

    def counting(tower, images, *args):
        calls.append(images.shape[0])
        return original(tower, images, *args)
    monkeypatch.setattr(Tower, "trunk", counting)
    return calls


def _sweep(cfgs):
    return sweep.run_sweep(cfgs, lambda index: runner.run_job(cfgs[index]))


def test_a_sweep_shares_one_trunk_and_each_record_equals_the_job_alone(synthetic, tmp_path, monkeypatch, caplog):
    jobs = PEARL_SWEEP + [["method=naclip"], ["method=sclip"]]  # sclip: other windows on VOC, so alone
    alone = {}
    calls = _trunk_calls(monkeypatch)
    for cfg in _cfgs(synthetic, tmp_path / "alone", jobs):
        status, record = runner.run_job(cfg)
        assert status == "ran"
        alone[record.config_hash] = record
        if len(alone) == 1:
            per_job = list(calls)  # the trunk passes of one job
    assert len(calls) > 5 * len(per_job)
    calls.clear()

    cfgs = _cfgs(synthetic, tmp_path / "together", jobs)
    fusions = []
    fuse = segmentor_module.Segmentor.fuse
    monkeypatch.setattr(segmentor_module.Segmentor, "fuse",
                        lambda self, *args: fusions.append(self.pa) or fuse(self, *args))
    caplog.set_level("INFO", logger="pearl")
    outcomes = _sweep(cfgs)
    assert "evaluated 5 jobs on one shared trunk" in caplog.text  # the four pearl variants and naclip
    sclip_calls = len(per_job)  # sclip (other windows on VOC) runs alone: as many batches as one job
    assert calls[:-sclip_calls] == per_job  # the five jobs' windows went through blocks 1..L−1 once
    # one last block and fusion per image for PEARL with PA, one without (TLP on or off), one for NACLIP
    images = next(iter(alone.values())).image_count
    assert images == 3 and sorted(fusions[:3 * images]) == [False] * 2 * images + [True] * images
    assert [status for status, _ in outcomes] == ["ran"] * 6
    for _, record in outcomes:
        twin = alone[record.config_hash]  # the same identity as the job run alone
        assert (record.mIoU, record.aAcc, record.mAcc) == (twin.mIoU, twin.aAcc, twin.mAcc)
        assert record.per_class_iou == twin.per_class_iou and record.image_count == twin.image_count
    assert not list((tmp_path / "together" / "runs").glob("*.lock"))  # every lock released
    assert list(sweep.evaluate_together(cfgs[:5])) == []  # all recorded: nothing to evaluate
    assert [status for status, _ in _sweep(cfgs)] == ["skipped"] * 6


def test_a_job_another_process_holds_is_left_out_of_the_group(synthetic, tmp_path):
    cfgs = _cfgs(synthetic, tmp_path, PEARL_SWEEP[:3])
    held_job = plan_module.plan(cfgs[0])
    (tmp_path / "runs").mkdir()
    held = try_lock(record_path(tmp_path, held_job.run_hash).with_suffix(".lock"))
    assert list(sweep.evaluate_together(cfgs)) == [[1, 2]]
    assert [runner.run_job(cfg)[0] for cfg in cfgs] == ["busy", "ran", "ran"]
    held.release()


def test_jobs_with_a_logger_or_several_workers_are_evaluated_alone(synthetic, tmp_path):
    cfgs = _cfgs(synthetic, tmp_path, [job + ["workers=2"] for job in PEARL_SWEEP[:2]])
    assert sweep.trunk_groups(cfgs) == [[0], [1]]
    assert plan_module.shared_trunk_key(cfgs[0]) is None


def test_jobs_whose_auto_precision_differs_on_a_gpu_do_not_share_a_trunk(synthetic, tmp_path, monkeypatch):
    """precision=auto is the method's released precision on a GPU (LPOSS: fp32): a group loads one
    model, so two jobs that would run at different precisions must not share it."""
    import torch

    from pearl.protocols import method_facts
    cfg = _cfgs(synthetic, tmp_path, PEARL_SWEEP[:1])[0]
    monkeypatch.setattr(plan_module, "resolve_device", lambda requested: torch.device("cuda"))
    fp16 = plan_module.shared_trunk_key(cfg)
    monkeypatch.setattr(plan_module, "method_facts",
                        lambda method: method_facts(method)._replace(gpu_precision="fp32"))
    assert fp16 is not None and plan_module.shared_trunk_key(cfg) not in (None, fp16)


@pytest.mark.slow  # a subprocess of run.py
def test_run_py_sweeps_share_the_trunk_by_default(synthetic, tmp_path):
    command = [sys.executable, "run.py", "-m", "model=tiny", f"data_root={synthetic}", f"results_dir={tmp_path}",
               "progress=false", "method=pearl", "pa=true,false", "tlp=true,false",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "evaluated 4 jobs on one shared trunk" in done.stdout + done.stderr
    assert "sweep: 4 ran, 0 skipped, 0 failed" in done.stderr
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4


@pytest.mark.slow  # two processes started by torchrun
def test_torchrun_shards_the_dataset_and_gives_the_single_process_metrics_bit_for_bit(synthetic, tmp_path):
    job = ["model=tiny", f"data_root={synthetic}", "progress=false", "device=cpu", "method=pearl",
           "dataset=ade20k,voc21", f"hydra.sweep.dir={tmp_path / 'sweeps'}"]
    single = subprocess.run([sys.executable, "run.py", "-m", *job, f"results_dir={tmp_path / 'one'}",
                             "hydra.sweep.subdir=one_${hydra.job.num}"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr
    ranked = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "run.py", "-m", *job, f"results_dir={tmp_path / 'two'}",
                             "hydra.sweep.subdir=two_${hydra.job.num}"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert ranked.returncode == 0, ranked.stderr
    from pearl.records import load_records
    one = {r.config_hash: r for r in load_records(tmp_path / "one")}
    two = {r.config_hash: r for r in load_records(tmp_path / "two")}
    assert set(one) == set(two) and len(one) == 2  # one record per job, written once (rank 0)
    for key, record in two.items():
        assert record.workers == 2 and one[key].workers == 1
        assert record.image_count == one[key].image_count and not record.skipped
        assert (record.mIoU, record.aAcc, record.mAcc) == (one[key].mIoU, one[key].aAcc, one[key].mAcc)
        assert record.per_class_iou == one[key].per_class_iou
    assert not list((tmp_path / "two" / "runs").glob("*.lock"))


@pytest.mark.slow  # the submitit plugin starts one process per job
def test_a_submitit_sweep_writes_each_record_and_resumes_like_a_local_one(synthetic, tmp_path):
    command = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", "model=tiny", f"data_root={synthetic}",
               f"results_dir={tmp_path / 'results'}", "progress=false"]
    first = subprocess.run(command + ["tlp=true,false", f"hydra.sweep.dir={tmp_path / 'first'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "sweep: 2 ran, 0 skipped, 0 failed" in first.stderr  # outcomes read back from the job folders
    assert len(list((tmp_path / "results" / "runs").glob("*.json"))) == 2
    again = subprocess.run(command + ["tlp=true,false,maybe", f"hydra.sweep.dir={tmp_path / 'again'}"], cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 1  # a failed job fails the sweep
    assert "sweep: 0 ran, 2 skipped, 1 failed" in again.stderr and "tlp='maybe' is not valid" in again.stderr


@pytest.mark.slow  # the submitit plugin starts one process per task
def test_a_submitit_sweep_runs_one_task_per_trunk_group_with_the_records_of_jobs_alone(synthetic, tmp_path):
    sweep = tmp_path / "sweep"
    command = [sys.executable, "run.py", "-m", "hydra/launcher=shared_trunk_submitit_local", "model=tiny",
               f"data_root={synthetic}", f"results_dir={tmp_path / 'results'}", "progress=false", "method=pearl",
               "pa=true,false", "tlp=true,false", "dataset=voc21,ade20k", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "8 jobs in 2 tasks" in done.stdout and "sweep: 8 ran, 0 skipped, 0 failed" in done.stderr
    task_logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(task_logs) == 2  # one task per dataset: its four jobs share blocks 1..L-1
    assert all("evaluated 4 jobs on one shared trunk" in log.read_text() for log in task_logs)
    from pearl.records import load_records
    grouped = {r.config_hash: r for r in load_records(tmp_path / "results")}
    assert len(grouped) == 8
    for cfg in _cfgs(synthetic, tmp_path / "alone", [job + ["dataset=ade20k"] for job in PEARL_SWEEP]):
        status, alone = runner.run_job(cfg)
        assert status == "ran"
        together = grouped[alone.config_hash]
        assert (together.mIoU, together.aAcc, together.per_class_iou) == (alone.mIoU, alone.aAcc, alone.per_class_iou)
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "sweep: 0 ran, 8 skipped, 0 failed" in again.stderr  # resume as on one machine


TWO_GROUPS = [job + [f"dataset={name}"] for name in ("voc21", "ade20k") for job in PEARL_SWEEP]


@pytest.fixture
def fresh_cli(monkeypatch):
    """The CLI's per-process outcomes and printed lines, empty for this test."""
    monkeypatch.setattr(cli, "_outcomes", [])
    monkeypatch.setattr(cli, "_printed", set())


def _failing_on(monkeypatch, dataset: str, error: BaseException):
    evaluate = evaluate_module.evaluate

    def failing(jobs, *args, **kwargs):
        if jobs[0].dataset.name == dataset:
            raise error
        return evaluate(jobs, *args, **kwargs)
    monkeypatch.setattr(sweep, "evaluate", failing)


def test_an_interrupted_sweep_keeps_the_groups_it_finished_and_holds_no_lock(synthetic, tmp_path, monkeypatch,
                                                                              fresh_cli):
    cfgs = _cfgs(synthetic, tmp_path, TWO_GROUPS)
    _failing_on(monkeypatch, "ade20k", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(cfgs, lambda index: cli.execute(cfgs[index]))
    runs = tmp_path / "runs"
    assert len(list(runs.glob("*.json"))) == 4  # the voc21 group, written before ade20k started
    assert not list(runs.glob("*.lock"))
    monkeypatch.undo()
    monkeypatch.setattr(cli, "_outcomes", [])
    assert sweep.run_sweep(cfgs, lambda index: cli.execute(cfgs[index])) == ["skipped"] * 4 + ["ran"] * 4


def test_a_failing_group_fails_its_own_jobs_and_the_others_still_run(synthetic, tmp_path, monkeypatch, fresh_cli,
                                                                      capsys):
    cfgs = _cfgs(synthetic, tmp_path, TWO_GROUPS)
    _failing_on(monkeypatch, "voc21", RuntimeError("a loader worker was killed"))
    assert sweep.run_sweep(cfgs, lambda index: cli.execute(cfgs[index])) == ["failed"] * 4 + ["ran"] * 4
    assert len(list((tmp_path / "runs").glob("*.json"))) == 4 and not list((tmp_path / "runs").glob("*.lock"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "RuntimeError: a loader worker was killed" in errors[0]  # once, not per job
    assert "Traceback" not in err
    summary = cli.summary_line()
    assert summary.startswith("sweep: 4 ran, 0 skipped, 4 failed") and summary.count("failed: [") == 4
    assert summary.count("a loader worker was killed") == 4  # the summary names every failed job
    assert cli.exit_code() == 1


def test_ctrl_c_ends_run_py_with_one_line_and_exit_code_130(fresh_cli, capsys):
    def interrupted():
        raise KeyboardInterrupt
    assert cli.main(interrupted) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_group_over_its_memory_budget_is_evaluated_in_parts(synthetic, tmp_path, monkeypatch, caplog):
    lines = (REPO / "pearl" / "resources" / "classes" / "voc21.txt").read_text().splitlines()
    queries = sum(len(line.split(", ")) for line in lines if line.strip())
    one_job = 6 * queries * 375 * 500  # VOC's typical 500×375 image, 6 bytes per query × pixel
    budget = 2.5 * one_job / 2 ** 30  # two jobs fit, three do not
    cfgs = _cfgs(synthetic, tmp_path, [job + [f"group_memory_gib={budget}"] for job in PEARL_SWEEP])
    assert sweep.prediction_bytes(plan_module.plan(cfgs[0])) == one_job
    caplog.set_level("INFO", logger="pearl")
    assert [status for status, _ in _sweep(cfgs)] == ["ran"] * 4
    assert caplog.text.count("evaluated 2 jobs on one shared trunk") == 2


@pytest.mark.slow  # run.py as a subprocess, interrupted with SIGINT as Ctrl-C does
def test_ctrl_c_during_a_sweep_keeps_the_finished_groups_and_a_rerun_does_the_rest(tmp_path):
    import signal
    import time

    from pearl.data.synthetic import write_dataset
    data = tmp_path / "data"
    write_dataset("voc21", data, num_images=3, size=(48, 64))
    write_dataset("ade20k", data, num_images=30, size=(240, 320), seed=1)  # a second group that takes seconds
    command = [sys.executable, "run.py", "-m", "model=tiny", f"data_root={data}", f"results_dir={tmp_path / 'res'}",
               "progress=false", "method=pearl", "pa=true,false", "tlp=true,false", "dataset=voc21,ade20k"]
    runs = tmp_path / "res" / "runs"
    sweep = subprocess.Popen(command + [f"hydra.sweep.dir={tmp_path / 'first'}"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                                                 signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while len(list(runs.glob("*.json"))) < 4 and time.monotonic() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # into the ade20k group's evaluation
    sweep.send_signal(signal.SIGINT)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted:") and "Traceback" not in err
    kept = len(list(runs.glob("*.json")))
    assert 4 <= kept < 8 and not list(runs.glob("*.lock"))
    again = subprocess.run(command + [f"hydra.sweep.dir={tmp_path / 'again'}"], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and f"sweep: {8 - kept} ran, {kept} skipped, 0 failed" in again.stderr


def test_each_job_of_a_sweep_is_planned_once(synthetic, tmp_path, monkeypatch):
    planned = []
    original = plan_module.plan

    def counting(cfg):
        planned.append(cfg.method.name)
        return original(cfg)
    monkeypatch.setattr(sweep, "plan", counting)
    monkeypatch.setattr(runner, "plan", counting)
    cfgs = _cfgs(synthetic, tmp_path, PEARL_SWEEP)
    assert [status for status, _ in _sweep(cfgs)] == ["ran"] * 4
    assert len(planned) == 4  # by the shared pass; each job's turn takes its planned job with its result
