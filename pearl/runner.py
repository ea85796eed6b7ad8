"""One job's turn, the Hydra task: plan it (``pearl.plan``), find its record or claim its lock,
evaluate it (``pearl.evaluate``; over several processes ``pearl.distributed``) or take what the
sweep's shared-trunk pass handed over (``pearl.sweep``), and write one result record. It reads the
config, never Hydra's global state.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import socket
import time
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__
from .data import DatasetError
from .distributed import evaluate_distributed, sharded_evaluation, torchrun_group
from .errors import ConfigError, UserError
from .evaluate import Shard, check_finite, evaluate, has_ground_truth, take_handed_over
from .loading import weights_state
from .locks import JobLock, read_owner, try_lock
from .plan import Job, config_key, plan, world_size
from .records import RunRecord, find_record, git_commit, prepare_results_dir, record_path, write_record
from .settings import OPERATIONAL_PARAMS
from .vfm import vfm_weights_state

log = logging.getLogger("pearl")


class GroupError(UserError, RuntimeError):
    """A job whose shared-trunk group failed while it was evaluated (the cause is in the message)."""


def _run_job_torchrun(cfg: DictConfig, job: Job, group: str | None) -> tuple[str, RunRecord | None]:
    """A job under ``torchrun --nproc_per_node=N``: rank 0 decides (record found, lock held by
    another process, or run) and tells the others; all ranks evaluate their shard; rank 0 writes
    the record (docs/speed.md §5)."""
    import torch.distributed as dist
    if cfg.workers > 1:
        raise ConfigError("workers>1 under torchrun: torchrun already starts one process per GPU; leave workers=1")
    rank, world, device = torchrun_group(job)
    status, existing, lock = _claim(cfg, job) if rank == 0 else (None, None, None)
    decision = [status]
    dist.broadcast_object_list(decision, src=0)
    if decision[0] != "run":
        return decision[0], existing
    start = time.perf_counter()
    try:
        merged = sharded_evaluation(job, rank, world, device)
        if rank != 0:
            return "ran", None
        return "ran", _finish_record(cfg, job, merged, time.perf_counter() - start, _wandb(cfg, job, group))
    finally:
        if lock is not None:
            lock.release()


def run(cfg: DictConfig, group: str | None = None) -> RunRecord | None:
    """The record of one job (evaluated now or found); see :func:`run_job`."""
    return run_job(cfg, group)[1]


def run_job(cfg: DictConfig, group: str | None = None) -> tuple[str, RunRecord | None]:
    """("ran" | "skipped" | "busy" | "dry_run", record): evaluate one (method, pa, tlp, dataset, model)
    configuration.

    A finished record of the same identity (same code version included) is returned without
    evaluating unless ``cfg.force``. A job another process is evaluating (it holds
    ``runs/<hash>.lock``) is left to it: "busy", no record. Nothing is written unless the whole dataset was evaluated.
    ``cfg.workers > 1`` splits the dataset over that many processes (GPUs), summing their
    confusion matrices. ``cfg.dry_run`` prints the resolved job and evaluates nothing.
    """
    if cfg.dry_run:
        return _dry_run(cfg)
    shared = take_handed_over(config_key(cfg))
    if shared is not None:  # planned and evaluated with other jobs of its sweep on one trunk; its lock still held
        job = shared.job
        with shared.lock:
            if shared.error is not None:
                raise GroupError(f"evaluated on one trunk with the other jobs of its group, which failed: "
                                 f"{shared.error}")  # the same line for each job: printed once
            return "ran", _finish_record(cfg, job, shared.shard, shared.wall_s, _wandb(cfg, job, group))
    job = plan(cfg)
    if world_size() > 1:
        return _run_job_torchrun(cfg, job, group)
    status, existing, lock = _claim(cfg, job)
    if status != "run":
        return status, existing
    with lock:
        return "ran", _evaluate_and_record(cfg, job, group)


def _claim(cfg: DictConfig, job: Job) -> tuple[str, RunRecord | None, JobLock | None]:
    """("skipped" | "busy", record, None) or ("run", None, the job's acquired lock)."""
    path = record_path(cfg.results_dir, job.run_hash)
    existing = find_record(path)
    if existing is not None and _lacks_diagnostics(cfg, job, existing):
        log.info("rerunning %s: its record %s has no diagnostics and diagnostics=true asks for them", job.title, path)
    if answered_by(cfg, job, existing):
        log.info("skipping %s: record %s exists (force=true reruns it)", job.title, path)
        return "skipped", existing, None
    prepare_results_dir(cfg.results_dir)  # an unwritable folder fails now, not after the evaluation
    lock = try_lock(path.with_suffix(".lock"))
    if lock is None:
        owner = read_owner(path.with_suffix(".lock"))
        log.info("skipping %s: being evaluated by another process (pid %s on %s, since %s)", job.title,
                 owner.get("pid", "?"), owner.get("host", "?"), owner.get("started", "?"))
        return "busy", None, None
    existing = find_record(path)
    if answered_by(cfg, job, existing):  # finished by another process meanwhile
        lock.release()
        log.info("skipping %s: record %s exists (force=true reruns it)", job.title, path)
        return "skipped", existing, None
    return "run", None, lock


def answered_by(cfg: DictConfig, job: Job, record: RunRecord | None) -> bool:
    """Whether ``record`` (None: none found) is the job's result: it exists, ``force`` is off and it
    has every diagnostic asked for."""
    return record is not None and not cfg.force and not _lacks_diagnostics(cfg, job, record)


def _lacks_diagnostics(cfg: DictConfig, job: Job, record: RunRecord) -> bool:
    """Whether ``diagnostics=true`` asks for what ``record`` (made without them) lacks."""
    return bool(cfg.diagnostics and (job.resolved["pa"] or job.resolved["tlp"]) and not record.diagnostics)


def _evaluate_and_record(cfg: DictConfig, job: Job, group: str | None) -> RunRecord:
    logger = _wandb(cfg, job, group)
    start = time.perf_counter()
    if cfg.workers > 1:
        shard = evaluate_distributed(job)  # prediction images are not logged from worker processes
    else:
        shard = evaluate([job], range(len(job.dataset)), job.device, logger)[0]
    return _finish_record(cfg, job, shard, time.perf_counter() - start, logger)


def _finish_record(cfg: DictConfig, job: Job, shard: Shard, wall_s: float, logger) -> RunRecord:
    check_finite(job, shard)
    record = _record(cfg, job, shard, wall_s)
    if record.split_matches_official is False:
        log.warning("%s has %d images, the official split has %d: the record says so", job.dataset.name,
                    record.dataset_size, record.expected_images)
    scores = (f"mIoU {record.mIoU:.2f}  aAcc {record.aAcc:.2f}  mAcc {record.mAcc:.2f}" if record.ground_truth
              else "no ground truth (a prediction run)")
    log.info("%s: %s  (%d images, %.2f img/s evaluating, setup %.1f s, %d skipped)", job.title, scores,
             record.image_count, record.images_per_second or 0, record.setup_time_s, len(record.skipped))
    if record.predictions_dir:
        log.info("predictions → %s", record.predictions_dir)
    if logger is not None and record.ground_truth:
        logger.finish(record, list(job.dataset.class_names), [c["iou"] for c in record.per_class_iou])
    log.info("record → %s", write_record(cfg.results_dir, record))
    return record


def _record(cfg: DictConfig, job: Job, shard: Shard, wall: float) -> RunRecord:
    dataset = job.dataset
    ground_truth = has_ground_truth(job)
    metrics = (shard.cm.summary() if ground_truth
               else {"mIoU": None, "aAcc": None, "mAcc": None, "per_class_iou": []})
    if ground_truth and not math.isfinite(metrics["mIoU"]):
        raise DatasetError(f"{dataset.name}: no labelled pixel was evaluated, so there is no mIoU; give masks "
                           f"(dataset.masks) or check the labels")
    official = dataset.total_images == dataset.expected_images if dataset.expected_images else None
    full_split = (official is not False and shard.evaluated == dataset.total_images and not shard.skipped)
    return RunRecord(
        config_hash=job.run_hash, identity=job.identity, method=cfg.method.name, dataset=dataset.name,
        pa=job.resolved["pa"], tlp=job.resolved["tlp"], profile=cfg.profile, model=job.model, params=job.resolved,
        overrides=job.overrides, deviations=job.deviations, code_version=job.identity["code_version"],
        mIoU=metrics["mIoU"], aAcc=metrics["aAcc"], mAcc=metrics["mAcc"],
        per_class_iou=[{"class": name, "iou": iou} for name, iou in zip(dataset.class_names,
                                                                        metrics["per_class_iou"])],
        ground_truth=ground_truth, predictions_dir=shard.predictions_dir,
        image_count=shard.evaluated, dataset_size=dataset.total_images, expected_images=dataset.expected_images,
        split_matches_official=official, full_split=full_split, max_images=cfg.max_images, skipped=shard.skipped,
        nan_windows=shard.nan_windows,
        # dataset means of the per-image PA / TLP diagnostics
        diagnostics={key: value / max(shard.evaluated, 1) for key, value in shard.diagnostic_sums.items()},
        setup_time_s=shard.setup_s, eval_time_s=shard.eval_s, wall_time_s=wall,
        images_per_second=shard.evaluated / shard.eval_s if shard.eval_s > 0 else None,
        workers=max(cfg.workers, world_size()),
        device=_device_name(job.device), precision=job.precision, package_version=__version__,
        git_commit=git_commit(), torch_version=torch.__version__, host=socket.gethostname(),
        platform=platform.platform(), finished_at=datetime.now().astimezone().isoformat(timespec="microseconds"))


def _dry_run(cfg: DictConfig) -> tuple[str, RunRecord | None]:
    """Print what the job would do, evaluating nothing, also when its data or weights are not there
    yet (it says so); ("dry_run", the existing record or None)."""
    try:
        job = plan(cfg)
    except DatasetError as error:
        print(f"[dry run] {cfg.method.name} pa={cfg.pa} tlp={cfg.tlp} {cfg.dataset.name}: cannot run yet, the data "
              f"is missing: {error}", flush=True)
        return "dry_run", None
    path = record_path(cfg.results_dir, job.run_hash)
    existing = find_record(path)
    state = f"record exists: {path}" if existing is not None else f"would run → {path}"
    settings = " ".join(f"{k}={v}" for k, v in job.resolved.items() if k not in OPERATIONAL_PARAMS)
    weights = "random (tiny)" if cfg.model.name == "tiny" else weights_state(
        str(cfg.model.name), cfg.model.pretrained, cfg.model.get("cache_dir"))
    vfm = "" if job.vfm is None else f", vfm {job.model['vfm']} (weights {vfm_weights_state(**job.vfm)})"
    print(f"[dry run] {job.title}: {state}\n  {len(job.dataset)} images, model {job.model['label']} "
          f"({job.precision}; weights {weights}){vfm}, settings: {settings}", flush=True)
    return "dry_run", existing


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _wandb(cfg: DictConfig, job: Job, group: str | None):
    if cfg.logger.name != "wandb":
        return None
    from .wandb_logger import WandbLogger
    return WandbLogger(project=cfg.logger.project, group=group, name=job.title.replace(" ", "-"),
                       job_type=cfg.method.name, tags=[cfg.method.name, cfg.dataset.name],
                       config=OmegaConf.to_container(cfg, resolve=True) | {"resolved_params": job.resolved,
                                                                              "config_hash": job.run_hash},
                       directory=str(Path(cfg.logger.dir).resolve()) if cfg.logger.get("dir") else None,
                       max_images=cfg.logger.max_images)

