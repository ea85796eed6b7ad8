"""One pass over (part of) a dataset for one job or several jobs that share a trunk: images read
and prepared ahead by data-loader workers, predicted a group at a time, each job's confusion
matrix, skipped items, diagnostics and saved pictures tallied on the device (``Shard``); and the
results a sweep's shared-trunk pass hands over to each job's turn.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .data import DatasetError
from .errors import ImageSizeError, UserError
from .joint import predict_jointly
from .locks import JobLock
from .methods import get_method
from .metrics import ConfusionMatrix
from .params import build_config
from .plan import EvaluationOptions, Job, build_model
from .preprocess import Normalisation, PreparedImage, WindowConfig, prepare_image
from .records import path_component, record_path
from .render import smoke_note, write_outputs
from .segmentor import Segmentor, warn_nan_windows
from .vfm import load_vfm


@dataclass
class Shard:
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


def _loaded_items(options: EvaluationOptions, dataset, indices: range, windows: WindowConfig,
                  normalisation: Normalisation,
                  keep_images: bool, device: torch.device):
    """The items in order, read ahead by ``loader_workers`` processes (none: in this process)."""
    loader = torch.utils.data.DataLoader(
        _Prepared(dataset, indices, windows, normalisation, keep_images), batch_size=None, shuffle=False,
        collate_fn=_as_is, num_workers=options.loader_workers, pin_memory=device.type == "cuda")
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

    def shard(self, setup_s: float, eval_s: float) -> "Shard":
        sums = {key: float(value) for key, value in self.sums.items()}  # the job's one device sync for them
        return Shard(self.cm, self.skipped, int(self.nan_windows), self.evaluated, sums, setup_s, eval_s,
                     str(self.predictions_dir) if self.saved else None, int(self.nan_images))

    def save(self, item: "_Loaded", labels: torch.Tensor, class_lines: Sequence[str]) -> None:
        """Write the label PNG and the overlay of one of the job's first ``save_limit`` images."""
        if self.saved < self.save_limit:  # sub/a.png → sub/a_*.png: never the same name as sub_a.png's
            *folders, name = item.id.split("/")
            write_outputs(self.predictions_dir.joinpath(*map(path_component, folders)), path_component(name),
                          item.image, labels.cpu().numpy(), list(class_lines), note=self.note)
            self.saved += 1


def _save_limit(job: Job) -> int:
    """Predictions to write: ``save_predictions``, or every image of a prediction run when not set."""
    if job.options.save_predictions is None:
        return 0 if has_ground_truth(job) else len(job.dataset)
    return job.options.save_predictions


def _segmentors(jobs: list[Job], device: torch.device) -> list[Segmentor]:
    model, tokenizer = build_model(jobs[0].options.model, device, jobs[0].precision)
    loaded: dict[tuple, object] = {}  # one load per second vision model the group's jobs read

    def vfm(job: Job):
        spec = job.vfm
        if spec is None:
            return None
        key = (spec["name"], spec["pretrained"], spec["cache_dir"])
        if key not in loaded:
            loaded[key] = load_vfm(spec["name"], spec["pretrained"], device, spec["cache_dir"])
        return loaded[key]
    return [Segmentor(model, job.classes, method=job.method, pa=job.resolved["pa"], tlp=job.resolved["tlp"],
                      tokenizer=tokenizer, device=device, window_batch_size=job.options.window_batch_size,
                      diagnostics=job.options.diagnostics, vfm=vfm(job), **job.params)
            for job in jobs]


def evaluate(jobs: list[Job], indices: range, device: torch.device, logger=None, show_progress: bool = True,
             progress_scale: int = 1) -> list[Shard]:
    """Run the jobs' Segmentors over ``indices`` of their (shared) dataset, one confusion matrix
    per job on ``device``. Several jobs share each image's decoding and blocks 1..L−1
    (:func:`pearl.joint.predict_jointly`), and so the model, the reading and the batching of the
    first job's options (equal for jobs that share a trunk: ``pearl.plan.shared_trunk_key``); each
    job keeps its own outputs and diagnostics. Their setup and evaluation times are the group's."""
    start = time.perf_counter()
    segmentors = _segmentors(jobs, device)
    setup_s = time.perf_counter() - start
    dataset, options = jobs[0].dataset, jobs[0].options
    tallies = [_Tally(seg.vocabulary.num_classes, device, _save_limit(job),
                      predictions_folder(job.options.results_dir, job.run_hash), smoke_note(job.options.model["name"]))
               for seg, job in zip(segmentors, jobs)]
    keep_images = logger is not None or any(tally.save_limit for tally in tallies)
    title = jobs[0].title if len(jobs) == 1 else f"{len(jobs)} jobs on {dataset.name} (one shared trunk)"
    bar = tqdm(total=len(dataset) if progress_scale > 1 else len(indices), desc=title, unit="img",
               dynamic_ncols=True, disable=not (options.progress and show_progress))
    items = _loaded_items(options, dataset, indices, segmentors[0].windows, segmentors[0].normalisation, keep_images,
                          device)
    for group in _image_groups(items, options.batch_images):
        ready = []
        for item in group:
            if item.error is None:
                ready.append(item)
            elif options.on_error == "skip":
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


def has_ground_truth(job: Job) -> bool:
    """False for a prediction run: ``dataset=folder`` without ``dataset.masks``."""
    return not (job.dataset.name == "folder" and getattr(job.dataset, "masks", None) is None)


def predictions_folder(results_dir: str | os.PathLike, run_hash: str) -> Path:
    """Where ``save_predictions`` writes a job's label PNGs and overlays: beside its record."""
    return record_path(results_dir, run_hash).with_suffix(".predictions")


class NumericalError(UserError, FloatingPointError):
    """A job whose computation gave NaN where its method's released code gives none."""


def check_finite(job: Job, shard: Shard) -> None:
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


@dataclass
class Evaluated:
    """A job evaluated ahead of its turn on a trunk shared with other jobs of its sweep, or the
    error that evaluation raised (then every job of the group fails with it, none re-evaluates)."""

    job: Job  # as planned by the sweep: the job's turn does not plan it again
    shard: Shard | None
    wall_s: float
    lock: JobLock
    error: str | None = None


_handed_over: dict[str, Evaluated] = {}  # config key → result, until that job's turn records it


def hand_over(key: str, evaluated: Evaluated) -> None:
    """Keep a job's result (or its group's error) for its turn (:func:`take_handed_over`), under
    its config's key (``pearl.plan.config_key``)."""
    _handed_over[key] = evaluated


def take_handed_over(key: str) -> Evaluated | None:
    """The result handed over for the job of config key ``key`` (its lock still held), once; None
    when none."""
    return _handed_over.pop(key, None)


def release_handed_over() -> None:
    """Release the locks of jobs evaluated together whose turn never came (an interrupted sweep):
    they have no record, so a rerun evaluates them."""
    while _handed_over:
        _, evaluated = _handed_over.popitem()
        evaluated.lock.release()

