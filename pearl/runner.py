"""The Hydra task: build the dataset, the model and the Segmentor from a config, evaluate, and
write one result record. Thin glue: it reads the config, never Hydra's global state.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import socket
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import __version__
from .backbone import load_clip, resolve_device, tiny_clip, weights_state
from .config import validate_config
from .data import DatasetError, build_dataset
from .errors import ConfigError, ImageSizeError, UserError
from .locks import JobLock, read_owner, try_lock
from .methods import get_method
from .metrics import ConfusionMatrix
from .params import PARAMS, build_config
from .preprocess import Normalisation, PreparedImage, WindowConfig, prepare_image
from .protocols import class_names, protocol
from .records import (
    DEFAULT_MODEL,
    SCHEMA_VERSION,
    RunRecord,
    code_version,
    config_hash,
    file_sha256,
    find_record,
    git_commit,
    model_label,
    path_component,
    prepare_results_dir,
    record_path,
    write_record,
)
from .render import smoke_note, write_outputs
from .segmentor import Segmentor, predict_jointly, warn_nan_windows
from .settings import OPERATIONAL_PARAMS, deviations, resolve_settings
from .text import load_vocabulary, template_set

log = logging.getLogger("pearl")


class GroupError(UserError, RuntimeError):
    """A job whose shared-trunk group failed while it was evaluated (the cause is in the message)."""


def _precision(requested: str, device: torch.device) -> str:
    if requested == "auto":  # released code: fp16 on GPU, fp32 on CPU (docs/protocol.md §7)
        return "fp16" if device.type == "cuda" else "fp32"
    return requested


def build_model(model_cfg: DictConfig, device: torch.device, precision: str):
    """(model, tokenizer): an open_clip model by name/tag/file, or the seeded random ``tiny`` model."""
    if model_cfg.name == "tiny":
        model, tokenizer = tiny_clip(model_cfg.seed, OmegaConf.to_container(model_cfg.config, resolve=True))
        if precision != "fp32":
            from open_clip.model import convert_weights_to_lp
            convert_weights_to_lp(model, {"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
        return model.to(device), tokenizer
    return load_clip(model_cfg.name, model_cfg.pretrained, device, precision, model_cfg.get("cache_dir"))


def _dataset(cfg: DictConfig):
    data = cfg.dataset
    if data.name == "folder":
        unset = [f"dataset.{key}" for key in ("images", "classes") if OmegaConf.is_missing(data, key)]
        if unset:
            raise ConfigError(f"dataset=folder needs {' and '.join(unset)}: e.g. dataset.images=/path/to/images "
                              f"dataset.classes=/path/to/classes.txt (docs/datasets.md)")
        return build_dataset("folder", images=data.images, classes=data.classes, masks=data.get("masks"),
                             mask_suffix=data.get("mask_suffix", ".png"),
                             reduce_zero_label=data.get("reduce_zero_label", False), max_images=cfg.max_images,
                             max_pixels=cfg.max_pixels)
    return build_dataset(data.name, cfg.data_root, cfg.max_images, cfg.max_pixels)


def model_identity(model_cfg: DictConfig, precision: str) -> dict:
    """What identifies the network: name and tag, or the checkpoint file's content hash; the tiny
    model's seed and config. ``label`` is the key the tables select by (``NAME:TAG``)."""
    if model_cfg.name == "tiny":
        return {"name": "tiny", "seed": model_cfg.seed, "config": OmegaConf.to_container(model_cfg.config),
                "label": model_label("tiny", seed=model_cfg.seed), "precision": precision}
    name, pretrained = str(model_cfg.name).replace("/", "-"), model_cfg.pretrained
    identity = {"name": name, "pretrained": pretrained, "precision": precision}
    if pretrained is not None and os.path.isfile(pretrained):
        identity.update(pretrained=None, file=Path(pretrained).name, file_sha256=file_sha256(pretrained))
    return identity | {"label": model_label(name, pretrained)}


def _settings(cfg: DictConfig) -> tuple[dict, dict, list[str] | str]:
    """(overrides given on the command line, Segmentor params, classes) for this job."""
    overrides = {name: cfg[name] for name in PARAMS if cfg.get(name) is not None}
    overrides = OmegaConf.to_container(OmegaConf.create(overrides), resolve=True)
    params = protocol(cfg.method.name, _protocol_dataset(cfg), cfg.profile)
    params.update(overrides)
    classes = cfg.dataset.classes if cfg.dataset.name == "folder" else class_names(cfg.dataset.name, cfg.method.name,
                                                                                    cfg.profile)
    return overrides, params, classes


def _protocol_dataset(cfg: DictConfig) -> str:
    return cfg.dataset.get("protocol_like") or cfg.dataset.name


@dataclass
class _Job:
    """Everything resolved about one configuration before any model is loaded."""

    method: str
    dataset: object
    device: torch.device
    precision: str
    overrides: dict
    params: dict
    classes: object
    resolved: dict
    deviations: dict
    model: dict
    identity: dict
    run_hash: str
    title: str


@dataclass
class _Shard:
    """What evaluating part of a dataset produced."""

    cm: ConfusionMatrix
    skipped: list
    nan_windows: int
    evaluated: int
    diagnostic_sums: dict  # sums over images of the Segmentor's per-image numeric diagnostics
    setup_s: float = 0.0   # model load and text encoding
    eval_s: float = 0.0    # the image loop alone
    predictions_dir: str | None = None  # where the first save_predictions predictions were written
    nan_images: int = 0  # images whose logits held NaN when decided


def _templates_hash(templates: str) -> str:
    """Hash of the prompt templates themselves (a template file's content, not its name)."""
    try:
        return hashlib.sha256("\n".join(template_set(templates)).encode()).hexdigest()[:16]
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _plan(cfg: DictConfig) -> _Job:
    validate_config(cfg)
    dataset = _dataset(cfg)  # a missing dataset fails here, before any model is loaded
    device = resolve_device(cfg.device)
    precision = _precision(cfg.model.precision, device)
    overrides, params, classes = _settings(cfg)
    try:
        resolved = resolve_settings(cfg.method.name, cfg.pa, cfg.tlp, params)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    changed = deviations(cfg.method.name, _protocol_dataset(cfg), cfg.profile, resolved)
    model = model_identity(cfg.model, precision)
    try:
        class_lines = list(load_vocabulary(classes).class_lines)
    except ValueError as error:
        raise ConfigError(f"classes of {cfg.dataset.name}: {error}") from None
    identity = {"schema": SCHEMA_VERSION, "code_version": code_version(), "method": cfg.method.name,
                "profile": cfg.profile, "params": {k: v for k, v in resolved.items() if k not in OPERATIONAL_PARAMS},
                "model": {k: v for k, v in model.items() if k != "label"}, "classes": class_lines,
                "templates": _templates_hash(resolved["templates"]),
                "dataset": dataset.fingerprint()}
    title = " ".join([cfg.method.name, f"pa={resolved['pa']}", f"tlp={resolved['tlp']}", dataset.name]
                     + [f"{k}={v}" for k, v in sorted(changed.items())]
                     + ([f"model={model['label']}"] if model["label"] != DEFAULT_MODEL else [])
                     + ([f"max_images={cfg.max_images}"] if cfg.max_images is not None else []))
    return _Job(cfg.method.name, dataset, device, precision, overrides, params, classes, resolved, changed, model,
                identity, config_hash(identity), title)


IMAGES_PER_GROUP_PIXELS = 2 ** 23  # original-size pixels of the images predicted together (bounds host memory)


class _Loaded(NamedTuple):
    """One dataset item as a data-loader worker hands it over: prepared for the device, or the
    error reading it raised (re-raised, or skipped, in the main process)."""

    index: int
    id: str
    prepared: PreparedImage | None
    label: torch.Tensor | None
    image: np.ndarray | None  # the decoded image, only when a logger or save_predictions draws it
    error: str | None


class _Prepared(torch.utils.data.Dataset):
    """The items of ``indices``, decoded, rescaled and normalised (in the loader's workers)."""

    def __init__(self, dataset, indices: range, windows: WindowConfig, normalisation: Normalisation,
                 keep_images: bool) -> None:
        self.dataset, self.indices, self.windows, self.keep_images = dataset, indices, windows, keep_images
        self.normalisation = normalisation

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> _Loaded:
        index = self.indices[position]
        item_id = self.dataset.items[index][0]
        try:
            sample = self.dataset[index]
            prepared = prepare_image(sample.image, self.windows, self.normalisation)
        except (DatasetError, ImageSizeError) as error:
            message = str(error) if isinstance(error, DatasetError) else f"image {item_id}: {error}"
            return _Loaded(index, item_id, None, None, None, message)
        label = torch.from_numpy(sample.label) if sample.label is not None else None
        return _Loaded(index, item_id, prepared, label, sample.image if self.keep_images else None, None)


def _as_is(item):
    return item


def _loaded_items(cfg: DictConfig, dataset, indices: range, windows: WindowConfig, normalisation: Normalisation,
                  keep_images: bool, device: torch.device):
    """The items in order, read ahead by ``cfg.loader_workers`` processes (none: in this process)."""
    loader = torch.utils.data.DataLoader(
        _Prepared(dataset, indices, windows, normalisation, keep_images), batch_size=None, shuffle=False,
        collate_fn=_as_is, num_workers=cfg.loader_workers, pin_memory=device.type == "cuda")
    return iter(loader)


def _image_groups(items, batch_images: int):
    """Consecutive items predicted together: at most ``batch_images``, at most
    ``IMAGES_PER_GROUP_PIXELS`` original pixels (an image larger than that goes alone)."""
    group, pixels = [], 0
    for item in items:
        size = math.prod(item.prepared.original_size) if item.prepared is not None else 0
        if group and (len(group) == batch_images or pixels + size > IMAGES_PER_GROUP_PIXELS):
            yield group
            group, pixels = [], 0
        group.append(item)
        pixels += size
    if group:
        yield group


class _Tally:
    """One job's running totals: its confusion matrix, skipped items and diagnostic sums (device tensors)."""

    def __init__(self, num_classes: int, device: torch.device, save_limit: int = 0,
                 predictions_dir: Path | None = None, note: str | None = None) -> None:
        self.cm = ConfusionMatrix(num_classes, device)
        self.save_limit, self.predictions_dir, self.saved = save_limit, predictions_dir, 0
        self.note = note  # the random model's mark on every saved picture
        self.skipped: list = []
        self.evaluated = self.windows = 0
        self.nan_windows = torch.zeros((), dtype=torch.long, device=device)
        self.nan_images = torch.zeros((), dtype=torch.long, device=device)
        self.sums: dict = {}

    def add(self, info: dict) -> None:
        self.nan_windows += info.get("nan_windows", 0)
        self.nan_images += info.get("nan_images", 0)
        self.windows += info.get("windows", 0)
        for key, value in info.items():
            if key.startswith(("pa_", "tlp_")):
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.evaluated += 1

    def shard(self, setup_s: float, eval_s: float) -> "_Shard":
        sums = {key: float(value) for key, value in self.sums.items()}  # the job's one device sync for them
        return _Shard(self.cm, self.skipped, int(self.nan_windows), self.evaluated, sums, setup_s, eval_s,
                      str(self.predictions_dir) if self.saved else None, int(self.nan_images))

    def save(self, item: "_Loaded", labels: torch.Tensor, class_lines: Sequence[str]) -> None:
        """Write the label PNG and the overlay of one of the job's first ``save_limit`` images."""
        if self.saved < self.save_limit:  # sub/a.png → sub/a_*.png: never the same name as sub_a.png's
            *folders, name = item.id.split("/")
            write_outputs(self.predictions_dir.joinpath(*map(path_component, folders)), path_component(name),
                          item.image, labels.cpu().numpy(), list(class_lines), note=self.note)
            self.saved += 1


def _save_limit(cfg: DictConfig, job: _Job) -> int:
    """Predictions to write: ``save_predictions``, or every image of a prediction run when not set."""
    if cfg.save_predictions is None:
        return 0 if _has_ground_truth(job) else len(job.dataset)
    return cfg.save_predictions


def _segmentors(cfg: DictConfig, jobs: list[_Job], device: torch.device) -> list[Segmentor]:
    model, tokenizer = build_model(cfg.model, device, jobs[0].precision)
    return [Segmentor(model, job.classes, method=job.method, pa=job.resolved["pa"], tlp=job.resolved["tlp"],
                      tokenizer=tokenizer, device=device, window_batch_size=cfg.window_batch_size,
                      diagnostics=cfg.diagnostics, **job.params) for job in jobs]


def _evaluate(cfg: DictConfig, jobs: list[_Job], indices: range, device: torch.device, logger=None,
              show_progress: bool = True, progress_scale: int = 1) -> list[_Shard]:
    """Run the jobs' Segmentors over ``indices`` of their (shared) dataset, one confusion matrix
    per job on ``device``. Several jobs share each image's decoding and blocks 1..L−1
    (:func:`pearl.segmentor.predict_jointly`); their setup and evaluation times are the group's."""
    start = time.perf_counter()
    segmentors = _segmentors(cfg, jobs, device)
    setup_s = time.perf_counter() - start
    dataset = jobs[0].dataset
    tallies = [_Tally(seg.vocabulary.num_classes, device, _save_limit(cfg, job),
                      predictions_folder(cfg.results_dir, job.run_hash), smoke_note(cfg.model.name))
               for seg, job in zip(segmentors, jobs)]
    keep_images = logger is not None or any(tally.save_limit for tally in tallies)
    title = jobs[0].title if len(jobs) == 1 else f"{len(jobs)} jobs on {dataset.name} (one shared trunk)"
    bar = tqdm(total=len(dataset) if progress_scale > 1 else len(indices), desc=title, unit="img",
               dynamic_ncols=True, disable=not (cfg.progress and show_progress))
    items = _loaded_items(cfg, dataset, indices, segmentors[0].windows, segmentors[0].normalisation, keep_images,
                          device)
    for group in _image_groups(items, cfg.batch_images):
        ready = []
        for item in group:
            if item.error is None:
                ready.append(item)
            elif cfg.on_error == "skip":
                for tally in tallies:
                    tally.skipped.append({"index": item.index, "id": item.id, "error": item.error})
            else:
                raise DatasetError(item.error)
        predictions = predict_jointly(segmentors, [item.prepared for item in ready], on_device=True)
        for item in ready:  # not zip(): its reused result tuple would keep the previous predictions alive
            outputs = next(predictions)
            label = item.label.to(device, non_blocking=True) if item.label is not None else None
            for tally, out, seg in zip(tallies, outputs, segmentors):
                if label is not None:
                    tally.cm.update(out.labels, label)
                tally.add(out.info)
                tally.save(item, out.labels, seg.vocabulary.class_lines)
            if logger is not None:
                logger.log_prediction(item.image, outputs[0].labels.cpu().numpy(),
                                      None if item.label is None else item.label.numpy(),
                                      list(dataset.class_names), item.id)
            del outputs, out  # this image's predictions are released before the next image's are made
        bar.update(min(len(group) * progress_scale, bar.total - bar.n))
        if bar.n % 50 < len(group) * progress_scale:  # a device sync: every 50 images, not every image
            bar.set_postfix(mIoU=f"{tallies[0].cm.summary()['mIoU']:.2f}", refresh=False)
    bar.close()
    eval_s = time.perf_counter() - start - setup_s
    shards = [tally.shard(setup_s, eval_s) for tally in tallies]
    for shard, tally, job in zip(shards, tallies, jobs):
        warn_nan_windows(shard.nan_windows, tally.windows, job.method)
    return shards


def _world_size() -> int:
    """Processes of a torchrun launch (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shard_indices(size: int, rank: int, world: int) -> range:
    """Contiguous, non-padding shard of ``range(size)`` (no image twice, none dropped; docs/engineering.md §6)."""
    return range(size * rank // world, size * (rank + 1) // world)


def _sharded_evaluation(cfg: DictConfig, job: _Job, rank: int, world: int, device: torch.device) -> _Shard | None:
    """This process's shard of the dataset, then one all-reduce of the int64 confusion matrix and
    one gather of the rest; rank 0 gets the merged shard, the others None. The progress bar (rank
    0) counts its own images times ``world``: an estimate of the global count, with no collective
    per image."""
    import torch.distributed as dist
    shard = _evaluate(cfg, [job], shard_indices(len(job.dataset), rank, world), device, show_progress=rank == 0,
                      progress_scale=world)[0]
    shard.cm.all_reduce()
    parts = [None] * world
    dist.all_gather_object(parts, (shard.skipped, shard.nan_windows, shard.evaluated, shard.diagnostic_sums,
                                   shard.setup_s, shard.eval_s, shard.nan_images))
    if rank != 0:
        return None
    sums: dict = {}
    for part in parts:
        for key, value in part[3].items():
            sums[key] = sums.get(key, 0.0) + value
    merged = _Shard(ConfusionMatrix.from_matrix(shard.cm.matrix.cpu()), [item for part in parts for item in part[0]],
                    sum(part[1] for part in parts), sum(part[2] for part in parts), sums,
                    max(part[4] for part in parts), max(part[5] for part in parts),
                    shard.predictions_dir,  # save_predictions: each process writes the first N of its shard
                    sum(part[6] for part in parts))
    if merged.evaluated + len(merged.skipped) != len(job.dataset):
        raise RuntimeError(f"{world} processes evaluated {merged.evaluated} + skipped {len(merged.skipped)} images, "
                           f"the dataset has {len(job.dataset)}")
    return merged


def _rank_device(job: _Job, local_rank: int) -> torch.device:
    device = torch.device("cuda", local_rank) if job.device.type == "cuda" else job.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _worker(rank: int, world: int, cfg_dict: dict, job: _Job, init_file: str, result_file: str) -> None:
    """One process of a ``workers=N`` job (planned once, by the parent)."""
    import torch.distributed as dist
    device = _rank_device(job, rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    try:
        merged = _sharded_evaluation(OmegaConf.create(cfg_dict), job, rank, world, device)
        if merged is not None:
            torch.save(merged, result_file)
    finally:
        dist.destroy_process_group()


def _evaluate_distributed(cfg: DictConfig, job: _Job) -> _Shard:
    """Spawn ``cfg.workers`` processes (one GPU each, or CPU with gloo) and merge their shards."""
    import tempfile

    import torch.multiprocessing as mp
    world = cfg.workers
    if job.device.type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"workers={world} but only {torch.cuda.device_count()} GPUs are visible; "
                         f"set workers to at most that")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = f"{tmp}/result.pt"
        mp.spawn(_worker, args=(world, OmegaConf.to_container(cfg, resolve=True), job, f"{tmp}/init", result_file),
                 nprocs=world, join=True)
        return torch.load(result_file, weights_only=False)  # our own file, written by our worker just now


def _torchrun_group(job: _Job) -> tuple[int, int, torch.device]:
    """(rank, world, device) of this torchrun process; the process group is made once per process."""
    import torch.distributed as dist
    device = _rank_device(job, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), device


def _run_job_torchrun(cfg: DictConfig, job: _Job, group: str | None) -> tuple[str, RunRecord | None]:
    """A job under ``torchrun --nproc_per_node=N``: rank 0 decides (record found, lock held by
    another process, or run) and tells the others; all ranks evaluate their shard; rank 0 writes
    the record (docs/speed.md §5)."""
    import torch.distributed as dist
    if cfg.workers > 1:
        raise ConfigError("workers>1 under torchrun: torchrun already starts one process per GPU; leave workers=1")
    rank, world, device = _torchrun_group(job)
    status, existing, lock = _claim(cfg, job) if rank == 0 else (None, None, None)
    decision = [status]
    dist.broadcast_object_list(decision, src=0)
    if decision[0] != "run":
        return decision[0], existing
    start = time.perf_counter()
    try:
        merged = _sharded_evaluation(cfg, job, rank, world, device)
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
    job = _plan(cfg)
    shared = _EVALUATED_TOGETHER.pop(job.run_hash, None)
    if shared is not None:  # evaluated with other jobs of its sweep on one trunk; its lock is still held
        with shared.lock:
            if shared.error is not None:
                raise GroupError(f"evaluated on one trunk with the other jobs of its group, which failed: "
                                 f"{shared.error}")  # the same line for each job: printed once
            return "ran", _finish_record(cfg, job, shared.shard, shared.wall_s, _wandb(cfg, job, group))
    if _world_size() > 1:
        return _run_job_torchrun(cfg, job, group)
    status, existing, lock = _claim(cfg, job)
    if status != "run":
        return status, existing
    with lock:
        return "ran", _evaluate_and_record(cfg, job, group)


def _claim(cfg: DictConfig, job: _Job) -> tuple[str, RunRecord | None, JobLock | None]:
    """("dry_run" | "skipped" | "busy", record, None) or ("run", None, the job's acquired lock)."""
    path = record_path(cfg.results_dir, job.run_hash)
    existing = find_record(path)
    if existing is not None and _lacks_diagnostics(cfg, job, existing):
        log.info("rerunning %s: its record %s has no diagnostics and diagnostics=true asks for them", job.title, path)
    if _answered_by(cfg, job, existing):
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
    if _answered_by(cfg, job, existing):  # finished by another process meanwhile
        lock.release()
        log.info("skipping %s: record %s exists (force=true reruns it)", job.title, path)
        return "skipped", existing, None
    return "run", None, lock


@dataclass
class _Evaluated:
    """A job evaluated ahead of its turn on a trunk shared with other jobs of its sweep, or the
    error that evaluation raised (then every job of the group fails with it, none re-evaluates)."""

    shard: _Shard | None
    wall_s: float
    lock: JobLock
    error: str | None = None


_EVALUATED_TOGETHER: dict[str, _Evaluated] = {}  # run hash → result, until that job's turn records it


def release_handed_over() -> None:
    """Release the locks of jobs evaluated together whose turn never came (an interrupted sweep):
    they have no record, so a rerun evaluates them."""
    while _EVALUATED_TOGETHER:
        _, evaluated = _EVALUATED_TOGETHER.popitem()
        evaluated.lock.release()


def shared_trunk_key(cfg: DictConfig) -> str | None:
    """Jobs with the same key compute identical blocks 1..L−1 for every window (same data, model,
    precision, device, rescale, windows, input dtype, padding, and the same batching), so one pass
    can evaluate them all; None for a job that is evaluated alone (several processes, a logger
    showing predictions, a dry run, a configuration that fails to resolve). From the job's config
    alone, without reading the data or the weights, so that a launcher can group jobs before
    submitting them. docs/speed.md §3."""
    if cfg.dry_run or cfg.workers > 1 or cfg.logger.name != "none" or _world_size() > 1:
        return None
    try:
        validate_config(cfg)
        _, params, _ = _settings(cfg)
        resolved = resolve_settings(cfg.method.name, cfg.pa, cfg.tlp, params)
    except (UserError, ValueError):
        return None
    method = get_method(cfg.method.name)
    windows = {name: resolved[name] for name in ("resize_short", "resize_long", "slide_crop", "slide_stride")}
    return config_hash({"dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "data_root": cfg.data_root,
                        "model": OmegaConf.to_container(cfg.model, resolve=True), "device": cfg.device,
                        "windows": windows,
                        "model_dtype_input": method.fuse_in_model_dtype, "padding": method.pad_crops_to_patch,
                        "batching": [cfg.batch_images, cfg.window_batch_size, cfg.loader_workers,
                                     cfg.group_memory_gib],
                        "reading": [cfg.on_error, cfg.max_pixels, cfg.max_images]})


def trunk_groups(cfgs: Sequence[DictConfig]) -> list[list[int]]:
    """The sweep's job indices in groups of equal :func:`shared_trunk_key` (a job without one
    alone), each group in sweep order, the groups in the order of their first job."""
    groups: list[list[int]] = []
    by_key: dict[str, list[int]] = {}
    for index, cfg in enumerate(cfgs):
        key = shared_trunk_key(cfg)
        if key is None:
            groups.append([index])
        elif key in by_key:
            by_key[key].append(index)
        else:
            groups.append(by_key.setdefault(key, [index]))
    return groups


PREDICTION_BYTES_PER_VALUE = 6  # host or device bytes one job holds per query × pixel of an image (fp32 logits
#                                 and what the decision makes from them; measured: benchmarks/bench_group_memory.py)


def prediction_bytes(job: _Job) -> int:
    """What one job of a shared-trunk group holds for one image: its queries × the pixels of the
    dataset's typical image (or of a folder's first image) × ``PREDICTION_BYTES_PER_VALUE``."""
    height, width = job.dataset.typical_size()
    return PREDICTION_BYTES_PER_VALUE * len(load_vocabulary(job.classes).queries) * height * width


def memory_chunks(jobs: Sequence[_Job], budget_gib: float) -> list[list[int]]:
    """Consecutive positions of ``jobs`` evaluated together: as many as fit ``budget_gib`` by
    :func:`prediction_bytes` (at least one each)."""
    chunks: list[list[int]] = []
    held = 0
    for position, job in enumerate(jobs):
        cost = prediction_bytes(job)
        if chunks and held + cost <= budget_gib * 2 ** 30:
            chunks[-1].append(position)
            held += cost
        else:
            chunks.append([position])
            held = cost
    return chunks


def evaluate_together(cfgs: Sequence[DictConfig]) -> Iterator[list[int]]:
    """Evaluate jobs of one trunk group (equal :func:`shared_trunk_key`) on one trunk, a
    memory-bounded chunk at a time (``group_memory_gib``), and yield the positions in ``cfgs`` of
    each chunk as soon as it is evaluated: each of those jobs' turn (:func:`run_job`) then writes
    its record (or fails with the chunk's error). Jobs already recorded, held by another process,
    repeated or failing to plan are not yielded: their turn reports them as usual. The locks of a
    chunk are held until its jobs' turns; :func:`release_handed_over` frees those never taken."""
    if len(cfgs) < 2:
        return
    planned: list[tuple[int, _Job]] = []
    for position, cfg in enumerate(cfgs):
        try:
            job = _plan(cfg)
            if _answered_by(cfg, job, find_record(record_path(cfg.results_dir, job.run_hash))):
                continue
        except Exception:  # noqa: BLE001 — the job's own turn plans it again and reports the error
            continue
        if all(job.run_hash != other.run_hash for _, other in planned):
            planned.append((position, job))
    if len(planned) < 2:
        return
    for chunk in memory_chunks([job for _, job in planned], cfgs[0].group_memory_gib):
        members = [(cfgs[planned[i][0]], planned[i][1], planned[i][0]) for i in chunk]
        locked = _lock_all(members) if len(members) > 1 else []
        if len(locked) < 2:
            for _, _, _, lock in locked:
                lock.release()
            continue
        _evaluate_chunk(locked)
        yield [position for _, _, position, _ in locked]


def _evaluate_chunk(locked: list) -> None:
    """Evaluate the (cfg, job, position, lock) of ``locked`` on one trunk and hand each job its
    shard, or the error, for its turn."""
    jobs = [job for _, job, _, _ in locked]
    start = time.perf_counter()
    try:
        shards = _evaluate(locked[0][0], jobs, range(len(jobs[0].dataset)), jobs[0].device)
    except Exception as error:  # noqa: BLE001 — one group's failure fails its jobs, not the sweep
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        if os.environ.get("PEARL_TRACEBACK"):
            log.exception("evaluating %d jobs on one trunk failed", len(jobs))
        for _, job, _, lock in locked:
            _EVALUATED_TOGETHER[job.run_hash] = _Evaluated(None, 0.0, lock, message)
        return
    except BaseException:  # Ctrl-C: nothing of this chunk is recorded, and no lock stays held
        for _, _, _, lock in locked:
            lock.release()
        raise
    wall_s = time.perf_counter() - start
    for (_, job, _, lock), shard in zip(locked, shards):
        _EVALUATED_TOGETHER[job.run_hash] = _Evaluated(shard, wall_s, lock)


def _lock_all(members: list) -> list:
    """(cfg, job, position, lock) for the members whose lock this process gets."""
    locked = []
    for cfg, job, position in members:
        prepare_results_dir(cfg.results_dir)
        path = record_path(cfg.results_dir, job.run_hash)
        lock = try_lock(path.with_suffix(".lock"))
        if lock is None:
            continue
        if _answered_by(cfg, job, find_record(path)):  # finished by another process since we looked
            lock.release()
            continue
        locked.append((cfg, job, position, lock))
    return locked


def _answered_by(cfg: DictConfig, job: _Job, record: RunRecord | None) -> bool:
    """Whether ``record`` (None: none found) is the job's result: it exists, ``force`` is off and it
    has every diagnostic asked for."""
    return record is not None and not cfg.force and not _lacks_diagnostics(cfg, job, record)


def _lacks_diagnostics(cfg: DictConfig, job: _Job, record: RunRecord) -> bool:
    """Whether ``diagnostics=true`` asks for what ``record`` (made without them) lacks."""
    return bool(cfg.diagnostics and (job.resolved["pa"] or job.resolved["tlp"]) and not record.diagnostics)


def _evaluate_and_record(cfg: DictConfig, job: _Job, group: str | None) -> RunRecord:
    logger = _wandb(cfg, job, group)
    start = time.perf_counter()
    if cfg.workers > 1:
        shard = _evaluate_distributed(cfg, job)  # prediction images are not logged from worker processes
    else:
        shard = _evaluate(cfg, [job], range(len(job.dataset)), job.device, logger)[0]
    return _finish_record(cfg, job, shard, time.perf_counter() - start, logger)


class NumericalError(UserError, FloatingPointError):
    """A job whose computation gave NaN where its method's released code gives none."""


def check_finite(job: _Job, shard: _Shard) -> None:
    """Raise NumericalError naming the stage when NaN reached the decision of any image, unless it
    came from windows that the method's released code itself makes NaN (SFP): a NaN logit would
    otherwise be decided as class 0 and recorded as a result."""
    if not shard.nan_images:
        return
    method_cls = get_method(job.method)
    method = method_cls(build_config(method_cls.Config, job.resolved, method_cls.config_prefix))
    if shard.nan_windows and method.releases_nan_windows():
        return
    stage = (f"method {job.method}'s last block (window logits{', PA included' if job.resolved['pa'] else ''})"
             if shard.nan_windows else "the refinement after fusion (TLP / PAMR)"
             if job.resolved["tlp"] or job.resolved["pamr"] else "the fusion of the windows")
    given = ", ".join(f"{name}={value}" for name, value in job.overrides.items()) or "none"
    raise NumericalError(f"{job.title}: {shard.nan_images} image(s) got NaN logits in {stage}; no record is written. "
                         f"Check the parameters given ({given}) and the weights, or try model.precision=fp32")


def _finish_record(cfg: DictConfig, job: _Job, shard: _Shard, wall_s: float, logger) -> RunRecord:
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


def _has_ground_truth(job: _Job) -> bool:
    """False for a prediction run: ``dataset=folder`` without ``dataset.masks``."""
    return not (job.dataset.name == "folder" and getattr(job.dataset, "masks", None) is None)


def predictions_folder(results_dir: str | os.PathLike, run_hash: str) -> Path:
    """Where ``save_predictions`` writes a job's label PNGs and overlays: beside its record."""
    return record_path(results_dir, run_hash).with_suffix(".predictions")


def _record(cfg: DictConfig, job: _Job, shard: _Shard, wall: float) -> RunRecord:
    dataset = job.dataset
    ground_truth = _has_ground_truth(job)
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
        workers=max(cfg.workers, _world_size()),
        device=_device_name(job.device), precision=job.precision, package_version=__version__,
        git_commit=git_commit(), torch_version=torch.__version__, host=socket.gethostname(),
        platform=platform.platform(), finished_at=datetime.now().astimezone().isoformat(timespec="microseconds"))


def _dry_run(cfg: DictConfig) -> tuple[str, RunRecord | None]:
    """Print what the job would do, evaluating nothing, also when its data or weights are not there
    yet (it says so); ("dry_run", the existing record or None)."""
    try:
        job = _plan(cfg)
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
    print(f"[dry run] {job.title}: {state}\n  {len(job.dataset)} images, model {job.model['label']} "
          f"({job.precision}; weights {weights}), settings: {settings}", flush=True)
    return "dry_run", existing


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _wandb(cfg: DictConfig, job: _Job, group: str | None):
    if cfg.logger.name != "wandb":
        return None
    from .wandb_logger import WandbLogger
    return WandbLogger(project=cfg.logger.project, group=group, name=job.title.replace(" ", "-"),
                       job_type=cfg.method.name, tags=[cfg.method.name, cfg.dataset.name],
                       config=OmegaConf.to_container(cfg, resolve=True) | {"resolved_params": job.resolved,
                                                                              "config_hash": job.run_hash},
                       directory=str(Path(cfg.logger.dir).resolve()) if cfg.logger.get("dir") else None,
                       max_images=cfg.logger.max_images)
