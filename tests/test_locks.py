"""One evaluation per job, with two sweeps at once; a dead owner's lock is taken over."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from pearl import plan as plan_module
from pearl import runner
from pearl.locks import read_owner, try_lock
from pearl.records import record_path

from .conftest import REPO, compose


def _job(synthetic, results):
    return ["model=tiny", f"data_root={synthetic}", f"results_dir={results}", "progress=false"]


def test_a_held_lock_makes_the_job_busy_and_its_release_lets_it_run(synthetic, tmp_path):
    cfg = compose(_job(synthetic, tmp_path))
    job = plan_module.plan(cfg)
    lock_file = record_path(tmp_path, job.run_hash).with_suffix(".lock")
    (tmp_path / "runs").mkdir()
    held = try_lock(lock_file)
    assert read_owner(lock_file) == {**read_owner(lock_file), "pid": os.getpid(), "host": socket.gethostname()}
    assert try_lock(lock_file) is None  # a second holder is refused, even in one process
    assert runner.run_job(cfg) == ("busy", None)
    assert not list((tmp_path / "runs").glob("*.json"))
    held.release()
    assert not lock_file.exists()
    status, record = runner.run_job(cfg)
    assert status == "ran" and record.image_count == 3 and not lock_file.exists()


def test_a_lock_whose_owner_was_killed_is_taken_over(synthetic, tmp_path):
    cfg = compose(_job(synthetic, tmp_path))
    lock_file = record_path(tmp_path, plan_module.plan(cfg).run_hash).with_suffix(".lock")
    lock_file.parent.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import sys, time; from pearl.locks import try_lock; "
                              f"assert try_lock({str(lock_file)!r}); print('held', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert owner.stdout.readline().strip() == "held"
        assert runner.run_job(cfg)[0] == "busy"
        assert read_owner(lock_file)["pid"] == owner.pid
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert lock_file.exists()  # a killed owner cannot clean up; its file stays
    assert runner.run_job(cfg)[0] == "ran"


@pytest.mark.slow  # a subprocess of run.py / pearl.tables
def test_two_identical_sweeps_started_together_evaluate_each_job_once(synthetic, tmp_path):
    command = [sys.executable, "run.py", "-m", *_job(synthetic, tmp_path), "tlp=true,false",
               f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    sweeps = [subprocess.Popen(command + [f"hydra.sweep.subdir=s{i}_${{hydra.job.num}}"], cwd=REPO, env=env,
                               stderr=subprocess.PIPE, text=True) for i in range(2)]
    summaries = [next(line for line in sweep.communicate(timeout=300)[1].splitlines() if line.startswith("sweep:"))
                 for sweep in sweeps]
    ran = [int(summary.split()[1]) for summary in summaries]
    assert sum(ran) == 2, summaries  # each of the two jobs evaluated by exactly one sweep
    records = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")]
    assert sorted(r["tlp"] for r in records) == [False, True]
