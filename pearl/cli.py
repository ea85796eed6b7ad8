"""The command line around the Hydra task: one-line errors, the sweep's closing summary, help.

``run.py`` calls :func:`execute` for each job; :class:`SweepSummary` (a Hydra callback set in
``conf/config.yaml``) prints "N ran, N skipped, N failed" at the end of a multirun, and
:func:`exit_code` makes the process fail when any job failed.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .errors import UserError

_outcomes: list[tuple[str, str]] = []  # (status, detail) of each job this process ran


def _show_traceback() -> bool:
    return bool(os.environ.get("PEARL_TRACEBACK") or os.environ.get("HYDRA_FULL_ERROR"))


STATUS_FILE = "pearl_status.txt"  # in each job's output folder: "<status>\t<detail>"


def execute(cfg: DictConfig, group: str | None = None, description: str = "", output_dir: str | None = None) -> str:
    """Run one job; returns "ran", "skipped", "busy" (another process is running it), "dry_run" or
    "failed". A job that fails, by a user error (bad key or value, missing dataset or weights) or
    by any other exception, fails alone: one line is printed (once for a message that several jobs
    of a sweep share), nothing is raised, unless PEARL_TRACEBACK=1. With ``output_dir`` the outcome
    is also written there, for a sweep whose jobs run in other processes (submitit) to be
    summarised, and an unexpected exception's traceback beside it (``pearl_traceback.txt``)."""
    from .runner import run_job
    try:
        status, _ = run_job(cfg, group)
        detail = ""
    except Exception as error:  # noqa: BLE001 — one job's failure never ends the sweep
        if _show_traceback():
            raise
        line = _one_line(error, output_dir)
        status, detail = "failed", f"[{description}] {line}"
        _print_once(f"error: {line}")
    _outcomes.append((status, detail))
    if output_dir is not None:
        Path(output_dir, STATUS_FILE).write_text(f"{status}\t{detail}", encoding="utf-8")
    return status


TRACEBACK_FILE = "pearl_traceback.txt"
_printed: set[str] = set()


def _one_line(error: Exception, output_dir: str | None) -> str:
    """A user error's message; for anything else its type and message, and where its traceback is."""
    if isinstance(error, UserError):
        return str(error)
    where = "PEARL_TRACEBACK=1 shows the traceback"
    if output_dir is not None:
        path = Path(output_dir, TRACEBACK_FILE)
        path.write_text("".join(traceback.format_exception(error)), encoding="utf-8")
        where = f"traceback in {path}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} (an unexpected error; {where})"


def _print_once(line: str) -> None:
    if line not in _printed:
        _printed.add(line)
        print(line, file=sys.stderr, flush=True)


INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


def main(hydra_main: Callable[[], object]) -> int:
    """run.py's entry: the exit code of ``hydra_main()`` (1 when any job failed); Ctrl-C ends it with
    one line and exit code 130. Every record written before it is kept and no lock stays held, so
    running the same command again evaluates only what is left."""
    try:
        hydra_main()
    except KeyboardInterrupt:
        if _show_traceback():
            raise
        print("interrupted: every finished job kept its record; run the same command again to evaluate the rest",
              file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT_CODE
    return exit_code()


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
