"""The run configuration's own keys (besides the Segmentor parameters of ``pearl.params``): default,
meaning and validation in one place. ``conf/config.yaml`` holds the same defaults (a test checks
that they agree); ``python run.py --help`` is generated from here.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

from omegaconf import DictConfig, OmegaConf

from .benchmarks import ALL_DATASETS
from .data.datasets import DEFAULT_MAX_PIXELS
from .errors import ConfigError
from .loading import TINY_CONFIG
from .methods import available_methods
from .params import PARAMS, valid_values
from .protocols import PROFILES
from .vfm import available_vfms


class RunKey(NamedTuple):
    default: Any
    meaning: str
    check: Callable[[Any], bool]
    valid: str  # the valid values, as the error message states them


def _bool(value) -> bool:
    return isinstance(value, bool)


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= low


def _device(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) is not None


RUN_KEYS: dict[str, RunKey] = {
    "pa": RunKey(None, "Procrustes alignment; null = the method's default (pearl: true)",
                 lambda v: v is None or _bool(v), "true, false or null"),
    "tlp": RunKey(None, "text-aware Laplacian propagation; null = the method's default (pearl: true)",
                  lambda v: v is None or _bool(v), "true, false or null"),
    "profile": RunKey("own", "protocol profile (whose resize / window / logit settings)", lambda v: v in PROFILES,
                      ", ".join(PROFILES)),
    "data_root": RunKey("${oc.env:PEARL_DATA,./data}", "folder holding the benchmarks (default $PEARL_DATA, else "
                        "./data)", lambda v: isinstance(v, str) and bool(v), "a folder path"),
    "results_dir": RunKey("results", "where records (runs/*.json) and tables are written",
                          lambda v: isinstance(v, str) and bool(v), "a folder path"),
    "force": RunKey(False, "rerun even if this job's record exists", _bool, "true or false"),
    "dry_run": RunKey(False, "print each job's resolved settings and whether its record exists; evaluate nothing",
                      _bool, "true or false"),
    "on_error": RunKey("raise", "a bad image or label: raise (stop the job) or skip (count it in the record)",
                       lambda v: v in ("raise", "skip"), "raise, skip"),
    "max_images": RunKey(None, "evaluate only the first N images (a partial run: never fills a table cell)",
                         lambda v: v is None or _int_at_least(1)(v), "an integer ≥ 1 or null"),
    "max_pixels": RunKey(DEFAULT_MAX_PIXELS, "largest image or label read (width × height); a larger file is a "
                         "dataset error (obeys on_error)", _int_at_least(1), "an integer ≥ 1"),
    "device": RunKey("auto", "auto = cuda if available, else cpu", _device, "auto, cpu, cuda, cuda:N, mps"),
    "workers": RunKey(1, "processes (one GPU each) that split one job's dataset", _int_at_least(1),
                      "an integer ≥ 1"),
    "window_batch_size": RunKey(None, "windows per batched forward; null = 64 on a GPU, on a CPU 8 or fewer for "
                                "windows of over 197 tokens (docs/speed.md §2; speed only)",
                                lambda v: v is None or _int_at_least(1)(v), "an integer ≥ 1 or null"),
    "batch_images": RunKey(8, "images whose windows share batched forwards (speed only)", _int_at_least(1),
                           "an integer ≥ 1"),
    "group_memory_gib": RunKey(4.0, "memory the jobs of a sweep evaluated on one shared trunk may hold for an "
                               "image's predictions; a larger group is evaluated in parts (docs/speed.md §3)",
                               lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                               "a number > 0"),
    "loader_workers": RunKey(2, "data-loader processes that decode and rescale images ahead (0 = in the main "
                             "process; speed only)", _int_at_least(0), "an integer ≥ 0"),
    "save_predictions": RunKey(None, "write the first N predictions of each job (label PNG + overlay) beside its "
                                "record; null = none, or all for a prediction run (dataset=folder without masks)",
                                lambda v: v is None or _int_at_least(0)(v), "an integer ≥ 0 or null"),
    "diagnostics": RunKey(False, "compute PA / TLP diagnostics into the record (extra work per image)", _bool,
                          "true or false"),
    "progress": RunKey(True, "show a progress bar per job", _bool, "true or false"),
}
CONFIG_GROUPS = ("method", "dataset", "model", "vfm", "logger")
_GROUP_KEYS = {
    "vfm": {"name", "pretrained", "cache_dir"},
    "method": {"name"},
    "dataset": {"name", "images", "classes", "masks", "mask_suffix", "reduce_zero_label", "protocol_like"},
    "model": {"name", "pretrained", "precision", "cache_dir", "seed", "config"},
    "logger": {"name", "project", "dir", "max_images"},
}
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16")


def group_options(group: str) -> tuple[str, ...]:
    """The options of a config group: registered here (methods, benchmarks, the tiny model) or a
    YAML file under conf/<group>/."""
    from pathlib import Path
    files = tuple(path.stem for path in (Path(__file__).resolve().parents[1] / "conf" / group).glob("*.yaml"))
    registered = {"method": available_methods(), "dataset": ALL_DATASETS, "model": ("tiny",), "logger": (),
                  "vfm": ("default", *available_vfms())}[group]
    return tuple(dict.fromkeys((*registered, *sorted(files))))


def unknown_override(arguments: list[str]) -> str | None:
    """The error for the first ``key=value`` command-line argument whose key run.py does not know
    (with the closest known key), before Hydra composes anything; None when all are known.
    ``+key=``, ``~key``, ``hydra…`` and flags are Hydra's to judge."""
    from .params import did_you_mean
    top = set(RUN_KEYS) | set(PARAMS) | set(CONFIG_GROUPS)
    for argument in arguments:
        key, sep, value = argument.partition("=")
        if not sep or argument.startswith(("-", "+", "~", "hydra")):
            continue
        group, dot, sub = key.partition(".")
        if not dot and group in CONFIG_GROUPS and "(" not in value:  # sweep functions (glob, range) are Hydra's
            options = group_options(group)
            for choice in value.split(","):
                if choice not in options:
                    return (f"{group}={choice!r} is not valid; {did_you_mean(choice, options)}valid: "
                            f"{', '.join(options)}")
        if group not in top:
            return (f"unknown key {key!r}; {did_you_mean(group, top)}see `python run.py --help` for the valid keys "
                    f"(a new key needs +{key}=...)")
        if dot and group in _GROUP_KEYS and sub not in _GROUP_KEYS[group]:
            return f"unknown key {key!r}; {did_you_mean(sub, _GROUP_KEYS[group])}valid: " + ", ".join(
                f"{group}.{name}" for name in sorted(_GROUP_KEYS[group]))
    return None


def _fail(key: str, value, valid: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} is not valid; valid: {valid}")


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for an unknown key (``+typo=1`` included) or an invalid run-key value.

    The Segmentor parameters are checked by ``resolve_settings`` with the rest of the job plan;
    both happen before any model is built.
    """
    known = set(RUN_KEYS) | set(PARAMS) | set(CONFIG_GROUPS) | {"hydra"}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        from .params import did_you_mean
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}; {did_you_mean(unknown[0], known)}see "
                          f"`python run.py --help` for the valid keys")
    for group, allowed in _GROUP_KEYS.items():
        extra = sorted(set(cfg[group].keys()) - allowed)
        if extra:
            raise ConfigError(f"unknown key(s) {', '.join(f'{group}.{k}' for k in extra)}; valid: "
                              f"{', '.join(sorted(allowed))}")
    for key, spec in RUN_KEYS.items():
        value = OmegaConf.select(cfg, key)
        if not spec.check(value):
            raise _fail(key, value, spec.valid)
    if cfg.method.name not in available_methods():
        raise _fail("method", cfg.method.name, ", ".join(available_methods()))
    if cfg.dataset.name not in ALL_DATASETS + ("folder",):
        raise _fail("dataset", cfg.dataset.name, ", ".join(ALL_DATASETS + ("folder",)))
    if cfg.model.precision not in PRECISION_CHOICES:
        raise _fail("model.precision", cfg.model.precision, ", ".join(PRECISION_CHOICES))
    if cfg.vfm.name is not None and cfg.vfm.name not in available_vfms():
        raise _fail("vfm", cfg.vfm.name, ", ".join(available_vfms()))


def register_config_groups() -> None:
    """Put into Hydra's config store what would otherwise be repeated in YAML: one ``method/<name>``
    option per registered method, one ``dataset/<name>`` option per benchmark (``dataset/folder.yaml``
    has keys of its own and stays a file), ``model/tiny`` (``pearl.loading.TINY_CONFIG``) and
    ``segmentor_params``, every Segmentor parameter as a null key. Called by run.py and the tests
    before composing."""
    from hydra.core.config_store import ConfigStore
    store = ConfigStore.instance()
    store.store(name="segmentor_params", node={name: None for name in PARAMS})
    store.store(group="model", name="tiny", node={"name": "tiny", "pretrained": None, "precision": "auto", "seed": 0,
                                                  "config": TINY_CONFIG})  # random weights: smoke figures only
    # a second vision model (docs/architecture.md §2.2): "default" = the method's own (tiny beside model=tiny)
    store.store(group="vfm", name="default", node={"name": None, "pretrained": "hub", "cache_dir": None})
    for name in available_vfms():
        store.store(group="vfm", name=name,
                    node={"name": name, "pretrained": None if name == "tiny" else "hub", "cache_dir": None})
    for name in available_methods():
        store.store(group="method", name=name, node={"name": name})
    for name in ALL_DATASETS:
        store.store(group="dataset", name=name, node={"name": name})


def help_text() -> str:
    """Every key with its default and meaning, for ``python run.py --help``."""
    def default(value) -> str:
        return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

    lines = ["Evaluate methods × PA × TLP × datasets; one record per job (python run.py -m key=a,b ...).", "",
             "Config groups: method=" + "|".join(available_methods())
             + "  dataset=" + "|".join(ALL_DATASETS + ("folder",))
             + "  model=vit_b16|tiny|custom  logger=none|wandb", "", "Run keys:"]
    lines += [f"  {key} (default {default(spec.default)}): {spec.meaning}" for key, spec in RUN_KEYS.items()]
    lines += ["", "Segmentor parameters (null = the method's published per-dataset value, else this default):"]
    lines += [f"  {name} (default {default(p.default)}; {valid_values(name)}): {p.meaning}"
              for name, p in PARAMS.items()]
    lines += ["", "Errors print one line; PEARL_TRACEBACK=1 (or HYDRA_FULL_ERROR=1) shows the traceback.",
              "Hydra's own flags: --hydra-help."]
    return "\n".join(lines).replace("$", "$$")  # the help template is a string.Template
