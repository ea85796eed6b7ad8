"""The command line around the Hydra task: one-line errors, the sweep's closing summary, help.

``run.py`` calls :func:`execute` for each job; :class:`SweepSummary` (a Hydra callback set in
``conf/config.yaml``) prints "N ran, N skipped, N failed" at the end of a multirun, and
:func:`exit_code` makes the process fail when any job failed.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .errors import UserError

_outcomes: list[tuple[str, str]] = []  # (status, detail) of each job this process ran


def _show_traceback() -> bool:
    return bool(os.environ.get("PEARL_TRACEBACK") or os.environ.get("HYDRA_FULL_ERROR"))


STATUS_FILE = "pearl_status.txt"  # in each job's output folder: "<status>\t<detail>"


def execute(cfg: DictConfig, group: str | None = None, description: str = "", output_dir: str | None = None) -> str:
    """Run one job; returns "ran", "skipped", "busy" (another process is running it), "dry_run" or
    "failed". A user error (bad key or value, missing dataset or weights) is printed as one line,
    not raised, unless PEARL_TRACEBACK=1. With ``output_dir`` the outcome is also written there,
    for a sweep whose jobs run in other processes (submitit) to be summarised."""
    from .runner import run_job
    try:
        status, _ = run_job(cfg, group)
        detail = ""
    except UserError as error:
        if _show_traceback():
            raise
        status, detail = "failed", f"[{description}] {error}"
        print(f"error: {error}", file=sys.stderr, flush=True)
    _outcomes.append((status, detail))
    if output_dir is not None:
        Path(output_dir, STATUS_FILE).write_text(f"{status}\t{detail}", encoding="utf-8")
    return status


def _outcomes_written_under(sweep_dir: str) -> list[tuple[str, str]]:
    outcomes = []
    for path in sorted(Path(sweep_dir).rglob(STATUS_FILE)):
        status, _, detail = path.read_text(encoding="utf-8").partition("\t")
        outcomes.append((status, detail))
    return outcomes


def summary_line() -> str:
    counts = {key: sum(1 for status, _ in _outcomes if status == key) for key in ("ran", "skipped", "busy",
                                                                               "failed", "dry_run")}
    line = f"sweep: {counts['ran']} ran, {counts['skipped']} skipped, "
    if counts["busy"]:
        line += f"{counts['busy']} being run by another process, "
    line += f"{counts['failed']} failed"
    if counts["dry_run"]:
        line += f", {counts['dry_run']} dry-run"
    failed = [detail for status, detail in _outcomes if status == "failed"]
    return line + ("".join(f"\n  failed: {detail}" for detail in failed))


def exit_code() -> int:
    return 1 if any(status == "failed" for status, _ in _outcomes) else 0


class SweepSummary(Callback):
    """Hydra callback: jobs that raised (bugs, not user errors) count as failed; one line at the end."""

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        if job_return.status == JobStatus.FAILED:
            overrides = " ".join(config.hydra.overrides.task)
            _outcomes.append(("failed", f"[{overrides}] {job_return._return_value!r}"))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not _outcomes:  # the jobs ran in other processes (hydra/launcher=submitit_*): read their outcomes
            _outcomes.extend(_outcomes_written_under(config.hydra.sweep.dir))
        print(summary_line(), file=sys.stderr, flush=True)
