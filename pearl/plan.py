"""A job planned from its config, before any model is loaded: the dataset listed and fingerprinted,
the device and precision, every parameter resolved, the model's identity, and the identity that
names its record (``Job``); and the key of the jobs that can share one trunk, from the config alone.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .config import validate_config
from .data import build_dataset
from .errors import ConfigError, MissingFileError, UserError
from .loading import load_clip, prepare_model, resolve_device, tiny_clip
from .methods import get_method
from .params import PARAMS
from .protocols import class_names, method_facts, protocol
from .records import DEFAULT_MODEL, SCHEMA_VERSION, code_version, config_hash, file_sha256, model_label
from .settings import OPERATIONAL_PARAMS, deviations, resolve_settings
from .text import load_vocabulary, template_set
from .vfm import TINY, vfm_for


def resolved_precision(requested: str, device: torch.device, method: str) -> str:
    """``requested``, or for "auto" what the method's released code runs: on a GPU its protocol's
    ``gpu_precision`` (fp16 but for LPOSS), fp32 on the CPU (docs/protocol.md §7)."""
    if requested == "auto":
        return method_facts(method).gpu_precision if device.type == "cuda" else "fp32"
    return requested


def build_model(model_cfg: dict, device: torch.device, precision: str):
    """(model, tokenizer): an open_clip model by name/tag/file, or the seeded random ``tiny`` model;
    ``model_cfg`` the ``model`` group as plain data."""
    if model_cfg["name"] == "tiny":
        model, tokenizer = tiny_clip(model_cfg["seed"], model_cfg["config"])
        return prepare_model(model, device, precision), tokenizer
    return load_clip(model_cfg["name"], model_cfg["pretrained"], device, precision, model_cfg.get("cache_dir"))


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


def job_params(cfg: DictConfig) -> tuple[dict, dict, list[str] | str]:
    """(overrides given on the command line, Segmentor params, classes) for this job."""
    overrides = {name: cfg[name] for name in PARAMS if cfg.get(name) is not None}
    overrides = OmegaConf.to_container(OmegaConf.create(overrides), resolve=True)
    params = protocol(cfg.method.name, protocol_dataset(cfg), cfg.profile)
    params.update(overrides)
    classes = cfg.dataset.classes if cfg.dataset.name == "folder" else class_names(cfg.dataset.name, cfg.method.name,
                                                                                    cfg.profile)
    return overrides, params, classes


def protocol_dataset(cfg: DictConfig) -> str:
    return cfg.dataset.get("protocol_like") or cfg.dataset.name


@dataclass(frozen=True)
class EvaluationOptions:
    """How a job is evaluated and where its outputs go: the run keys the evaluation reads
    (pearl/config.py gives each one's meaning), read from the config once, by ``plan``."""

    model: dict                    # the model group as plain data (name, pretrained, cache_dir; tiny: seed, config)
    results_dir: str
    workers: int
    loader_workers: int
    batch_images: int
    window_batch_size: int | None
    on_error: str
    save_predictions: int | None
    diagnostics: bool
    progress: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> EvaluationOptions:
        return cls(OmegaConf.to_container(cfg.model, resolve=True), str(cfg.results_dir), cfg.workers,
                   cfg.loader_workers, cfg.batch_images, cfg.window_batch_size, cfg.on_error, cfg.save_predictions,
                   cfg.diagnostics, cfg.progress)


@dataclass
class Job:
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
    options: EvaluationOptions
    vfm: dict | None = None  # vfm_spec: for a method that reads a second vision model


def _templates_hash(templates: str) -> str:
    """Hash of the prompt templates themselves (a template file's content, not its name)."""
    try:
        return hashlib.sha256("\n".join(template_set(templates)).encode()).hexdigest()[:16]
    except ValueError as error:
        raise ConfigError(str(error)) from None


def plan(cfg: DictConfig) -> Job:
    validate_config(cfg)
    dataset = _dataset(cfg)  # a missing dataset fails here, before any model is loaded
    device = resolve_device(cfg.device)
    precision = resolved_precision(cfg.model.precision, device, cfg.method.name)
    overrides, params, classes = job_params(cfg)
    try:
        resolved = resolve_settings(cfg.method.name, cfg.pa, cfg.tlp, params)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    changed = deviations(cfg.method.name, protocol_dataset(cfg), cfg.profile, resolved)
    model = model_identity(cfg.model, precision)
    vision = vfm_spec(cfg)
    if vision is not None:  # part of the network: the record names it beside CLIP
        model = {**model, "vfm": vfm_label(vision)}
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
    return Job(cfg.method.name, dataset, device, precision, overrides, params, classes, resolved, changed, model,
               identity, config_hash(identity), title, EvaluationOptions.from_config(cfg), vision)


def vfm_spec(cfg: DictConfig) -> dict | None:
    """The second vision model a job loads (``pearl.vfm.vfm_for``): name, weights
    ("hub", a file, or None for random) and cache folder; None for a method that reads none."""
    name = vfm_for(cfg.method.name, cfg.vfm.name, cfg.model.name)
    if name is None:
        return None
    pretrained = None if name == TINY else cfg.vfm.pretrained
    if pretrained not in (None, "hub") and not os.path.isfile(pretrained):
        raise MissingFileError(f"vfm.pretrained={pretrained!r} does not exist; give an existing checkpoint file, "
                               f"hub (the Hugging Face cache) or null (random weights)")
    return {"name": name, "pretrained": pretrained, "cache_dir": cfg.vfm.cache_dir}


def vfm_label(spec: dict) -> str:
    """``NAME:hub``, ``NAME:random`` or ``NAME:<file name>@<sha256 prefix>`` (a file by its content)."""
    pretrained = spec["pretrained"]
    if pretrained is None:
        return f"{spec['name']}:random"
    if pretrained != "hub" and os.path.isfile(pretrained):
        return f"{spec['name']}:{Path(pretrained).name}@{file_sha256(pretrained)[:16]}"
    return f"{spec['name']}:{pretrained}"


def config_key(cfg: DictConfig) -> str:
    """What names a job's config (its resolved content): the sweep hands the job it planned and
    evaluated to the job's turn under this key, so no job is planned twice."""
    return config_hash(OmegaConf.to_container(cfg, resolve=True))


def world_size() -> int:
    """Processes of a torchrun launch (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def shared_trunk_key(cfg: DictConfig) -> str | None:
    """Jobs with the same key compute identical blocks 1..L−1 for every window (same data, model,
    precision, device, rescale, windows, input dtype, padding, and the same batching), so one pass
    can evaluate them all; None for a job that is evaluated alone (several processes, a logger
    showing predictions, a dry run, a configuration that fails to resolve). From the job's config
    alone, without reading the data or the weights, so that a launcher can group jobs before
    submitting them. docs/speed.md §3."""
    if cfg.dry_run or cfg.workers > 1 or cfg.logger.name != "none" or world_size() > 1:
        return None
    try:
        validate_config(cfg)
        _, params, _ = job_params(cfg)
        resolved = resolve_settings(cfg.method.name, cfg.pa, cfg.tlp, params)
        precision = resolved_precision(cfg.model.precision, resolve_device(cfg.device), cfg.method.name)
    except (UserError, ValueError):
        return None
    method = get_method(cfg.method.name)
    windows = {name: resolved[name] for name in ("resize_short", "resize_long", "slide_crop", "slide_stride")}
    return config_hash({"dataset": OmegaConf.to_container(cfg.dataset, resolve=True), "data_root": cfg.data_root,
                        "model": OmegaConf.to_container(cfg.model, resolve=True), "device": cfg.device,
                        "precision": precision,  # auto is the method's own on a GPU (LPOSS: fp32)
                        "windows": windows,
                        "model_dtype_input": method.fuse_in_model_dtype, "padding": method.pad_crops_to,
                        "positions": method.position_interpolation,
                        "batching": [cfg.batch_images, cfg.window_batch_size, cfg.loader_workers,
                                     cfg.group_memory_gib],
                        "reading": [cfg.on_error, cfg.max_pixels, cfg.max_images]})

