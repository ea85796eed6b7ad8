"""The Hydra task: build the dataset, the model and the Segmentor from a config, evaluate, and
write one result record. Thin glue: it reads the config, never Hydra's global state.
"""
from __future__ import annotations

import logging
import os
import platform
import socket
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from . import __version__
from .backbone import load_clip
from .data import DatasetError, build_dataset
from .metrics import ConfusionMatrix
from .params import PARAMS
from .protocols import class_names, protocol
from .records import config_hash, git_commit, read_record, record_path, write_record
from .segmentor import Segmentor, resolve_settings

log = logging.getLogger("pearl")


def _device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def _precision(requested: str, device: torch.device) -> str:
    if requested == "auto":  # released code: fp16 on GPU, fp32 on CPU (protocol.md §7)
        return "fp16" if device.type == "cuda" else "fp32"
    return requested


def build_model(model_cfg: DictConfig, device: torch.device, precision: str):
    """(model, tokenizer): an open_clip model by name/tag/file, or the seeded random ``tiny`` model."""
    if model_cfg.name == "tiny":
        import open_clip
        torch.manual_seed(model_cfg.seed)
        model = open_clip.CLIP(**OmegaConf.to_container(model_cfg.config, resolve=True)).eval()
        if precision != "fp32":
            from open_clip.model import convert_weights_to_lp
            convert_weights_to_lp(model, {"fp16": torch.float16, "bf16": torch.bfloat16}[precision])
        return model.to(device), open_clip.get_tokenizer("ViT-B-16")
    return load_clip(model_cfg.name, model_cfg.pretrained, device, precision, model_cfg.get("cache_dir"))


def _dataset(cfg: DictConfig):
    data = cfg.dataset
    if data.name == "folder":
        return build_dataset("folder", images=data.images, classes=data.classes, masks=data.get("masks"),
                             mask_suffix=data.get("mask_suffix", ".png"),
                             reduce_zero_label=data.get("reduce_zero_label", False), max_images=cfg.max_images)
    return build_dataset(data.name, cfg.data_root, cfg.max_images)


def _settings(cfg: DictConfig) -> tuple[dict, dict, list[str] | str]:
    """(overrides given on the command line, Segmentor params, classes) for this job."""
    overrides = {name: cfg[name] for name in PARAMS if cfg.get(name) is not None}
    overrides = OmegaConf.to_container(OmegaConf.create(overrides), resolve=True)
    reference = cfg.dataset.get("protocol_like") or cfg.dataset.name
    params = protocol(cfg.method.name, reference, cfg.profile)
    params.update(overrides)
    classes = cfg.dataset.classes if cfg.dataset.name == "folder" else class_names(cfg.dataset.name, cfg.method.name,
                                                                                    cfg.profile)
    return overrides, params, classes


def run(cfg: DictConfig, group: str | None = None) -> dict:
    """Evaluate one (method, pa, tlp, dataset, model) configuration; returns its result record.

    An existing record of the same configuration is returned without evaluating unless
    ``cfg.force``. Nothing is written unless the whole dataset was evaluated.
    """
    dataset = _dataset(cfg)  # a missing dataset fails here, before any model is loaded
    device = _device(cfg.device)
    precision = _precision(cfg.model.precision, device)
    overrides, params, classes = _settings(cfg)
    _, resolved = resolve_settings(cfg.method.name, cfg.pa, cfg.tlp, params)
    model_identity = OmegaConf.to_container(cfg.model, resolve=True) | {"precision": precision}
    identity = {"method": cfg.method.name, "dataset": dataset.name, "data_root": str(dataset.root),
                "model": model_identity, "profile": cfg.profile, "params": resolved, "classes": classes,
                "max_images": cfg.max_images, "on_error": cfg.on_error, "device_type": device.type}
    run_hash = config_hash(identity)
    existing = record_path(cfg.results_dir, run_hash)
    if existing.is_file() and not cfg.force:
        log.info("skipping %s: record %s exists (force=true reruns it)", _title(cfg, resolved), existing)
        return read_record(existing)

    model, tokenizer = build_model(cfg.model, device, precision)
    seg = Segmentor(model, classes, method=cfg.method.name, pa=cfg.pa, tlp=cfg.tlp, tokenizer=tokenizer,
                    device=device, window_batch_size=cfg.window_batch_size, **params)
    logger = _wandb(cfg, resolved, group)
    cm = ConfusionMatrix(seg.vocabulary.num_classes, device)
    skipped, nan_windows, evaluated = [], 0, 0
    start = time.perf_counter()
    bar = tqdm(range(len(dataset)), desc=_title(cfg, resolved), unit="img", dynamic_ncols=True,
               disable=not cfg.progress)
    for index in bar:
        try:
            sample = dataset[index]
        except DatasetError as error:
            if cfg.on_error != "skip":
                raise
            skipped.append({"index": index, "id": dataset.items[index][0], "error": str(error)})
            continue
        out = seg.predict(sample.image, on_device=True)
        nan_windows += out.info.get("nan_windows", 0)
        if sample.label is not None:
            cm.update(out.labels, torch.from_numpy(sample.label))
        if logger is not None:
            logger.log_prediction(sample.image, out.labels.cpu().numpy(), sample.label, list(dataset.class_names),
                                  sample.id)
        evaluated += 1
        if evaluated % 10 == 0 or index == len(dataset) - 1:
            bar.set_postfix(mIoU=f"{cm.summary()['mIoU']:.2f}", refresh=False)
    wall = time.perf_counter() - start
    metrics = cm.summary()
    record = {
        "config_hash": run_hash, "identity": identity, "method": cfg.method.name, "dataset": dataset.name,
        "pa": resolved["pa"], "tlp": resolved["tlp"], "profile": cfg.profile, "model": model_identity,
        "params": resolved, "overrides": overrides, "mIoU": metrics["mIoU"], "aAcc": metrics["aAcc"],
        "mAcc": metrics["mAcc"], "per_class_iou": [{"class": name, "iou": iou} for name, iou in zip(dataset.class_names,
                                                                             metrics["per_class_iou"])],
        "image_count": evaluated, "dataset_size": dataset.total_images, "expected_images": dataset.expected_images,
        "split_matches_official": (dataset.total_images == dataset.expected_images
                                   if dataset.expected_images else None),
        "skipped": skipped, "nan_windows": nan_windows, "wall_time_s": wall,
        "images_per_second": evaluated / wall if wall > 0 else None, "device": _device_name(device),
        "precision": precision, "package_version": __version__, "git_commit": git_commit(),
        "torch_version": torch.__version__, "host": socket.gethostname(), "platform": platform.platform(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if record["split_matches_official"] is False:
        log.warning("%s has %d images, the official split has %d: the record says so", dataset.name,
                    dataset.total_images, dataset.expected_images)
    path = write_record(cfg.results_dir, record)
    if logger is not None:
        logger.finish(record, list(dataset.class_names), metrics["per_class_iou"])
    log.info("%s: mIoU %.2f  aAcc %.2f  mAcc %.2f  (%d images, %.2f img/s, %d skipped) → %s", _title(cfg, resolved),
             metrics["mIoU"], metrics["aAcc"], metrics["mAcc"], evaluated, record["images_per_second"] or 0,
             len(skipped), path)
    return record


def _title(cfg: DictConfig, resolved: dict) -> str:
    return f"{cfg.method.name} pa={resolved['pa']} tlp={resolved['tlp']} {cfg.dataset.name}"


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _wandb(cfg: DictConfig, resolved: dict, group: str | None):
    if cfg.logger.name != "wandb":
        return None
    from .wandb_logger import WandbLogger
    return WandbLogger(project=cfg.logger.project, group=group, name=_title(cfg, resolved).replace(" ", "-"),
                       job_type=cfg.method.name, tags=[cfg.method.name, cfg.dataset.name],
                       config=OmegaConf.to_container(cfg, resolve=True) | {"resolved_params": resolved},
                       directory=str(Path(cfg.logger.dir).resolve()) if cfg.logger.get("dir") else None,
                       max_images=cfg.logger.max_images)
