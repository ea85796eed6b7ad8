"""The results store: one JSON record per finished run under ``<results_dir>/runs/``.

A record is written atomically (temporary file, then rename) and named by a hash of the run's
identity (everything that changes the numbers), so a rerun of the same configuration finds it
and is skipped; a killed sweep resumes by running the same command again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
from pathlib import Path


def config_hash(identity: dict) -> str:
    """Stable short hash of a JSON-able dict (keys sorted)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_path(results_dir: str | os.PathLike, run_hash: str) -> Path:
    return Path(results_dir) / "runs" / f"{run_hash}.json"


def _clean(value):
    """JSON has no NaN: write NaN/inf as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_record(results_dir: str | os.PathLike, record: dict) -> Path:
    """Write ``record`` (which holds ``config_hash``) atomically; returns its path."""
    path = record_path(results_dir, record["config_hash"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_clean(record), indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
    return path


def read_record(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def load_records(results_dir: str | os.PathLike) -> list[dict]:
    """Every record under ``results_dir/runs`` (unreadable files are reported, not skipped silently)."""
    records = []
    for path in sorted((Path(results_dir) / "runs").glob("*.json")):
        try:
            records.append(read_record(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"result record {path} is not valid JSON ({error}); delete it and rerun that job") from None
    return records


def git_commit() -> str | None:
    """The commit of the package's checkout, with '+dirty' when it has changes; None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")
