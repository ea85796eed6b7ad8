"""Method registry: name → class. Each module in this package defines one method.

A method says how the last ViT block computes (and, for SFP, which earlier layers it reads);
windows, fusion, refinement and the decision rule are shared (``pearl.segmentor``).
Each module registers its class with ``@register``; the modules are found and imported the first
time the registry is asked (never while this package is still being initialised), so adding a
method is adding one file plus its ``resources/protocols/<name>.yaml``.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from ..protocols import method_facts
from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``, with the facts of its protocol
    file (``pearl.protocols.method_facts``: default pa / tlp / arch, query·key term)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    for name, value in method_facts(cls.name)._asdict().items():
        setattr(cls, name, value)
    _REGISTRY[cls.name] = cls
    return cls


@functools.lru_cache(maxsize=None)
def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(available_methods())}")
    return _REGISTRY[name]



