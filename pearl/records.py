"""The results store: one typed JSON record per finished run under ``<results_dir>/runs/``.

A record is named by the hash of its *identity*: everything that made the number (method, pa/tlp,
every resolved parameter, the model and its weights, precision, classes, templates, the evaluated
data and the code version; see ``docs/records.md``). A rerun of the same configuration with the
same code finds its record and is skipped; a change to any of these gives a new identity, so the
job runs again and the old record stays beside it as history. Written atomically (temporary file,
then rename). Tables, figures and wandb read records through :class:`RunRecord` only.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import UserError

SCHEMA_VERSION = 2
DEFAULT_MODEL = "ViT-B-16:openai"  # the model of the paper's tables; others get their own tables
PACKAGE_ROOT = Path(__file__).resolve().parent
# Every file of the package is in exactly one of these two lists (a test checks it), so a new module
# is classified when it is added. A folder ends in "/".
COMPUTES_NUMBERS = (  # the code version hashes these: a change to any of them may change a metric
    "loading.py", "registry.py", "towers/", "checkpoints.py", "methods/", "procrustes.py", "refine/", "text.py",
    "preprocess.py", "segmentor.py", "fused.py", "decision.py", "joint.py", "params.py", "protocols.py",
    "benchmarks.py", "resources/", "data/datasets.py", "metrics.py", "plan.py", "evaluate.py", "distributed.py",
    "runner.py", "settings.py", "tiny.py", "vfm.py", "propagation.py",
)
COMPUTES_NO_NUMBER = (  # the CLI and sweep glue, records and locks, reports and tools, data preparation
    "__init__.py", "config.py", "cli.py", "errors.py", "stages.py", "sweep.py", "locks.py", "records.py", "tables.py",
    "figures.py", "render.py", "wandb_logger.py", "segment.py", "attention.py", "bench.py", "data/__init__.py",
    "data/__main__.py", "data/check.py", "data/convert.py", "data/digests.py", "data/download.py",
    "data/synthetic.py",  # what prepare writes is seen by the data fingerprint, which hashes content
)


def _listed(relative: str, listing: tuple[str, ...]) -> bool:
    return any(relative == entry or (entry.endswith("/") and relative.startswith(entry)) for entry in listing)


class RecordError(UserError, ValueError):
    """A record file that is not a valid record of the current schema, or a results folder that
    cannot hold records."""


def config_hash(identity: dict) -> str:
    """Stable short hash of a JSON-able dict (keys sorted)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def package_files(package_root: Path = PACKAGE_ROOT) -> list[str]:
    """The package's files (relative, POSIX), caches left out."""
    return sorted(path.relative_to(package_root).as_posix() for path in package_root.rglob("*")
                  if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc")


@functools.lru_cache(maxsize=None)
def code_version(package_root: Path = PACKAGE_ROOT) -> str:
    """Hash of the files that compute numbers (``COMPUTES_NUMBERS``: their paths and contents).

    Any change to that code, committed or not, changes it; a change to a tool, a report, the CLI
    glue, the README or the tests does not. Computed once per process.
    """
    digest = hashlib.sha256()
    for relative in package_files(package_root):
        path = package_root / relative
        if _listed(relative, COMPUTES_NUMBERS):
            digest.update(relative.encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def git_commit(package_root: Path = PACKAGE_ROOT) -> str | None:
    """The commit of the package's checkout, with '+dirty' when it has changes; None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               cwd=package_root, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, computed once per (path, size, mtime) in a process."""
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


OPENAI_FILE_SHA256 = {  # OpenAI's released TorchScript archives: the same weights as the ``openai`` tag
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f": "ViT-B-16",
}


def model_label(name: str, pretrained: str | None = None, seed: int = 0) -> str:
    """The ``NAME:TAG`` key that tables select a model by.

    ``tiny`` → ``tiny:seed<seed>``; a checkpoint file → ``NAME:<file name>``, or ``NAME:openai`` for
    OpenAI's own archive (recognised by its SHA-256); an OpenAI tag drops ``-quickgelu`` from the
    name, since ``load_clip`` builds OpenAI weights with QuickGELU either way.
    """
    if name == "tiny":
        return f"tiny:seed{seed}"
    name = name.replace("/", "-")
    if pretrained is not None and os.path.isfile(pretrained):
        sha = file_sha256(pretrained)
        return f"{OPENAI_FILE_SHA256[sha]}:openai" if sha in OPENAI_FILE_SHA256 else f"{name}:{Path(pretrained).name}"
    return f"{name.removesuffix('-quickgelu') if pretrained == 'openai' else name}:{pretrained}"


@dataclass
class RunRecord:
    """One finished evaluation. ``identity`` (hashed into ``config_hash``) is what made the number;
    the rest is the result and where and how fast it was computed."""

    config_hash: str
    identity: dict
    method: str
    dataset: str
    pa: bool
    tlp: bool
    profile: str
    model: dict                # name, pretrained, label (the tables' model key), file_sha256, precision
    params: dict               # every resolved Segmentor parameter
    overrides: dict            # the parameters given on the command line
    deviations: dict           # resolved parameters that differ from the method's protocol
    code_version: str
    mIoU: float | None         # None only for a prediction run (no ground truth)
    aAcc: float | None
    mAcc: float | None
    per_class_iou: list
    image_count: int
    dataset_size: int
    expected_images: int | None
    split_matches_official: bool | None
    full_split: bool           # the whole official split, nothing skipped: the only kind a table cell takes
    max_images: int | None = None
    ground_truth: bool = True  # False: a prediction run (dataset=folder without masks), no metrics
    predictions_dir: str | None = None  # the label PNGs and overlays written (save_predictions)
    skipped: list = field(default_factory=list)
    nan_windows: int = 0
    diagnostics: dict = field(default_factory=dict)
    setup_time_s: float = 0.0
    eval_time_s: float = 0.0
    wall_time_s: float = 0.0
    images_per_second: float | None = None
    workers: int = 1
    device: str = ""
    precision: str = ""
    package_version: str = ""
    git_commit: str | None = None
    torch_version: str = ""
    host: str = ""
    platform: str = ""
    finished_at: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def model_label(self) -> str:
        return self.model.get("label", "")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data) -> "RunRecord":
        """Validate and build; raises RecordError saying what is wrong."""
        if not isinstance(data, dict):
            raise RecordError(f"a record is a JSON object, this is a {type(data).__name__}")
        version = data.get("schema_version", 1)
        if version != SCHEMA_VERSION:
            raise RecordError(f"schema version {version}, this code reads version {SCHEMA_VERSION} (records made "
                              f"before the record identity held the code version and the data); rerun the job")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise RecordError(f"missing field(s) {', '.join(missing)}")
        record = cls(**{k: v for k, v in data.items() if k in names})
        record._check()
        return record

    def _check(self) -> None:
        if not self.ground_truth:
            if any(value is not None for value in (self.mIoU, self.aAcc, self.mAcc)) or self.per_class_iou:
                raise RecordError("a prediction run (ground_truth false) holds metrics")
        elif not _is_number(self.mIoU):
            raise RecordError(f"mIoU is {self.mIoU!r}, not a number: the run did not finish")
        for name in ("aAcc", "mAcc"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                raise RecordError(f"{name} is {value!r}, not a number")
        if not isinstance(self.image_count, int) or isinstance(self.image_count, bool) or self.image_count < 1:
            raise RecordError(f"image_count is {self.image_count!r}: no image was evaluated")
        for name, kind in (("identity", dict), ("params", dict), ("model", dict), ("overrides", dict),
                           ("deviations", dict), ("per_class_iou", list), ("pa", bool), ("tlp", bool),
                           ("full_split", bool), ("method", str), ("dataset", str), ("config_hash", str),
                           ("code_version", str), ("finished_at", str)):
            if not isinstance(getattr(self, name), kind):
                raise RecordError(f"{name} is {getattr(self, name)!r}, expected a {kind.__name__}")
        for name in ("identity", "params", "model", "method", "dataset", "code_version"):
            if not getattr(self, name):
                raise RecordError(f"{name} is empty")
        if not isinstance(self.dataset_size, int) or self.dataset_size < self.image_count:
            raise RecordError(f"dataset_size is {self.dataset_size!r}, not a count ≥ image_count {self.image_count}")
        try:
            self.finished_time
        except ValueError:
            raise RecordError(f"finished_at is {self.finished_at!r}, not an ISO 8601 time") from None
        if config_hash(self.identity) != self.config_hash:
            raise RecordError(f"its identity hashes to {config_hash(self.identity)}, not to its config_hash "
                              f"{self.config_hash}: edited or damaged")

    @property
    def finished_time(self) -> datetime:
        """``finished_at`` as a time-zone-aware time (a time without an offset is taken as UTC)."""
        moment = datetime.fromisoformat(self.finished_at)
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)

    @property
    def evaluated_share(self) -> float:
        """How much of its dataset's split the record evaluated (1 for the whole)."""
        return self.image_count / max(self.dataset_size, 1)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def path_component(text: str) -> str:
    """``text`` as one safe file or folder name: characters other than letters, digits, ``-_.``
    become ``_`` and leading dots too (no ``..``, no hidden names, never a path)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))
    stripped = name.lstrip(".")
    return "_" * (len(name) - len(stripped)) + stripped or "_"


def record_path(results_dir: str | os.PathLike, run_hash: str) -> Path:
    if not run_hash or not all(c.isalnum() or c in "-_" for c in run_hash):
        raise ValueError(f"record hash {run_hash!r} is not a plain name")
    return Path(results_dir) / "runs" / f"{run_hash}.json"


def prepare_results_dir(results_dir: str | os.PathLike) -> Path:
    """Create ``results_dir/runs``, prove it writable with a probe file, and remove temporary files
    left by killed writers; raises RecordError naming the folder when it cannot be written."""
    runs = Path(results_dir) / "runs"
    probe = runs / f".probe.{os.getpid()}"
    try:
        runs.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RecordError(f"results_dir={results_dir}: records cannot be written to {runs} ({error.strerror or error});"
                          f" choose a writable folder") from None
    for stale in runs.glob(".*.tmp"):
        if _abandoned(stale):
            stale.unlink(missing_ok=True)
    return runs


ABANDONED_AFTER_S = 24 * 3600  # a temporary record this old is a dead writer's, whichever host wrote it


def _host() -> str:
    return path_component(socket.gethostname()).replace(".", "_")


def _writer() -> str:
    """``<host>.<pid>`` of this process, in its temporary files' names (hosts may share a results folder)."""
    return f"{_host()}.{os.getpid()}"


def _abandoned(temporary: Path) -> bool:
    """Whether a ``.<record>.<host>.<pid>.tmp`` file is left by a dead writer: one of this host whose
    process is gone, or any older than ``ABANDONED_AFTER_S`` (another host's live writer is never
    touched: its pid means nothing here)."""
    host, pid = temporary.name.removesuffix(".tmp").rsplit(".", 2)[-2:]
    try:
        age = time.time() - temporary.stat().st_mtime
    except FileNotFoundError:
        return False
    if age > ABANDONED_AFTER_S:
        return True
    return host == _host() and pid.isdigit() and not _process_alive(int(pid))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean(value):
    """JSON has no NaN: write NaN/inf as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_record(results_dir: str | os.PathLike, record: RunRecord) -> Path:
    """Write ``record`` atomically (temporary file, fsync, rename); returns its path."""
    path = record_path(results_dir, record.config_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{_writer()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(_clean(record.to_dict()), indent=2, sort_keys=True, default=str))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_record(path: str | os.PathLike) -> RunRecord:
    """The record in ``path``; raises RecordError naming the file for anything unreadable or
    invalid, a record whose name is not its identity's hash included."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise RecordError(f"{path} cannot be read ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path} is not a JSON record ({error})") from None
    try:
        record = RunRecord.from_dict(data)
    except (RecordError, TypeError) as error:
        raise RecordError(f"{path}: {error}") from None
    if path.stem != record.config_hash:
        raise RecordError(f"{path}: the record inside is {record.config_hash}.json (copied or renamed)")
    return record


def find_record(path: Path) -> RunRecord | None:
    """The finished record at ``path``, or None: absent, or not a valid finished record, which is
    then named in a warning and moved to ``runs/invalid/`` (kept for inspection, never read again)."""
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except RecordError as error:
        aside = path.parent / "invalid" / path.name
        try:
            aside.parent.mkdir(exist_ok=True)
            os.replace(path, aside)
            where = f"moved to {aside}"
        except OSError:
            where = "left in place (the folder is not writable)"
        warnings.warn(f"ignoring {error}; {where}; the job runs again", RuntimeWarning, stacklevel=2)
        return None


def load_records(results_dir: str | os.PathLike) -> list[RunRecord]:
    """Every valid record under ``results_dir/runs``; each invalid one is named in a warning and skipped."""
    records = []
    for path in sorted((Path(results_dir) / "runs").glob("*.json")):
        record = find_record(path)
        if record is not None:
            records.append(record)
    return records
