"""Published per-method, per-dataset settings and the byte-exact class-name files.

The settings are data: one YAML per method under ``resources/protocols/`` (copied from the
released configs named in each file's ``source``), read here and nowhere else.
"""
from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import yaml

from .benchmarks import ALL_DATASETS, BENCHMARKS, DATASET_ALIASES

PROFILES = ("own", "pearl", "clearclip", "naclip_v1", "naclip_readme", "resclip")
_WINDOW_KEYS = ("resize_short", "slide_crop", "slide_stride", "logit_scale", "prob_thd")


def _resource(*parts: str) -> Path:
    return Path(str(resources.files("pearl").joinpath("resources", *parts)))


def canonical_dataset(dataset: str) -> str:
    """``pc60`` → ``context60`` etc.; raises ValueError naming the valid keys."""
    key = DATASET_ALIASES.get(dataset, dataset)
    if key not in ALL_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(ALL_DATASETS)} "
                         f"(aliases: {', '.join(DATASET_ALIASES)})")
    return key


def protocol_methods() -> list[str]:
    """The methods that have a protocol file (each registered method has one; a test checks it)."""
    return sorted(path.stem for path in _resource("protocols").glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def _method_table(method: str) -> dict:
    """A method's protocol file; ``datasets_of: other`` takes the per-dataset rows of the method
    whose released configs it runs under (MaskCLIP under ClearCLIP's), so they are written once."""
    path = _resource("protocols", f"{method}.yaml")
    if not path.is_file():
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(protocol_methods())}")
    with open(path) as f:
        table = yaml.safe_load(f)
    if "datasets_of" in table:
        table["datasets"] = _method_table(table["datasets_of"])["datasets"]
    return table


class MethodFacts(NamedTuple):
    """What a method is, read from the ``method:`` entry of its protocol file."""

    default_pa: bool           # pa=null means this
    default_tlp: bool          # tlp=null means this
    default_arch: str          # arch=null means this: "reduced" or "vanilla"
    has_query_key_term: bool   # PA (which rotates keys against queries) can change it
    resclip_host: bool         # resclip=true applies (ResCLIP's released code has its attention strategy)
    vfm: str | None   # the second vision model it reads by default (pearl.vfm), or None
    gpu_precision: str  # what its released code runs on a GPU ("fp16", or "fp32": LPOSS); precision=auto


@functools.lru_cache(maxsize=None)
def method_facts(method: str) -> MethodFacts:
    """The facts of ``method`` (ValueError naming the valid methods for an unknown one)."""
    entry = _method_table(method).get("method") or {}
    missing = [name for name in MethodFacts._fields if name not in entry]
    if missing:
        raise ValueError(f"pearl/resources/protocols/{method}.yaml: its method entry lacks {', '.join(missing)}")
    return MethodFacts(*(entry[name] for name in MethodFacts._fields))


def resclip_hosts() -> list[str]:
    """Methods resclip=true applies to."""
    return [name for name in protocol_methods() if method_facts(name).resclip_host]


@functools.lru_cache(maxsize=None)
def plug_in_protocol(plug_in: str, dataset: str) -> dict:
    """The per-dataset settings of a plug-in (``resources/plugins/<plug_in>.yaml``; ResCLIP's
    weights) as Segmentor parameters; a dataset without a row (``protocol_like`` falls back to its
    borrowed row) gets none."""
    dataset = canonical_dataset(dataset)
    with open(_resource("plugins", f"{plug_in}.yaml")) as f:
        rows = yaml.safe_load(f)["datasets"]
    like = BENCHMARKS[dataset].protocol_like
    return dict(rows.get(dataset) or rows.get(like) or {})


def pa_methods() -> list[str]:
    """Methods whose last-block attention has a query·key term, the only ones PA can change."""
    return [name for name in protocol_methods() if method_facts(name).has_query_key_term]


def _row(method: str, dataset: str, profile: str) -> dict:
    dataset = canonical_dataset(dataset)
    if profile not in PROFILES:
        raise ValueError(f"unknown protocol profile {profile!r}; valid: {', '.join(PROFILES)}")
    rows = _method_table(method)["datasets"]
    like = BENCHMARKS[dataset].protocol_like
    if dataset not in rows and like is None:
        raise ValueError(f"method {method!r} has no published settings for {dataset!r}: add a row to "
                         f"pearl/resources/protocols/{method}.yaml or set protocol_like in pearl/benchmarks.py")
    row = dict(rows[dataset] if dataset in rows else rows[like])
    if profile == "pearl":
        ref = _row("pearl", dataset, "own")
        row.update({k: ref[k] for k in _WINDOW_KEYS + ("tlp_grid",)}, area_thd=0.0, names="base")
    elif profile == "clearclip":
        ref = _row("clearclip", dataset, "own")
        row.update({k: ref[k] for k in _WINDOW_KEYS + ("names",)}, area_thd=0.0)
        if method == "vanilla" and row["prob_thd"] > 0:
            row["prob_thd"] = 0.2  # ClearCLIP maintainer's CLIP setting, mc-lan/ClearCLIP#2
    elif profile == "resclip":  # ResCLIP's segmentor runs every host with its NACLIP-v2 configs
        ref = _row("naclip", dataset, "own")
        row.update({k: ref[k] for k in _WINDOW_KEYS + ("names",)}, area_thd=0.0)
    elif profile in ("naclip_v1", "naclip_readme"):
        if method != "naclip":
            raise ValueError(f"profile {profile!r} applies to method 'naclip' only, not {method!r}")
        if profile == "naclip_v1":  # sinahmr/NACLIP@7d9d463: VOC slid, COCO-Stuff at S = 448
            if dataset in ("voc21", "voc20"):
                row.update(slide_crop=224, slide_stride=112)
            if dataset == "coco_stuff":
                row["resize_short"] = 448
        else:
            row["pamr"] = True  # the README's "reproduce the main results" command
    return row


def protocol(method: str, dataset: str, profile: str = "own") -> dict:
    """The published settings of ``method`` on ``dataset`` as Segmentor parameters.

    ``profile``: ``own`` (the method's released configs), ``pearl`` (PEARL's resize / window /
    logit_scale / prob_thd for any method, as in the TLP plug-in table), ``clearclip`` (ClearCLIP's),
    ``naclip_v1`` (NACLIP before v2), ``naclip_readme`` (NACLIP v2 with PAMR on) or ``resclip``
    (ResCLIP's, which are NACLIP v2's, for any host: its plug-in rows).
    """
    row = _row(method, dataset, profile)
    row.pop("names")
    return row


def class_file(dataset: str, method: str | None = None, profile: str = "own") -> Path:
    """Path of the class-name file that ``method`` (None = base files) uses on ``dataset``."""
    dataset = canonical_dataset(dataset)
    variant = _row(method, dataset, profile)["names"] if method else "base"
    stem = BENCHMARKS[dataset].class_stem
    path = _resource("classes", f"{stem}.txt" if variant == "base" else f"{stem}.{variant}.txt")
    if not path.is_file() and BENCHMARKS[dataset].protocol_like:  # a borrowed row's variant names another file
        path = _resource("classes", f"{stem}.txt")
    return path


def parse_class_lines(text: str) -> list[str]:
    """Split a class file as the released parsers do: lines, then drop ``\\n`` only."""
    if text.endswith("\n"):  # readlines() yields no empty last line for a final newline
        text = text[:-1]
    return [line.replace("\n", "") for line in text.split("\n")]


def class_names(dataset: str, method: str | None = None, profile: str = "own") -> list[str]:
    """The byte-exact class lines (one per class, synonyms joined by ``", "``)."""
    return parse_class_lines(class_file(dataset, method, profile).read_text(encoding="utf-8"))
