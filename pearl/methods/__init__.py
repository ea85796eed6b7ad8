"""Method registry: name → class. Each module in this package defines one method.

A method says how the last ViT block computes (and, for SFP, which earlier layers it reads);
windows, fusion, refinement and the decision rule are shared (``pearl.segmentor``).
Modules here are imported automatically, so adding a method is adding one file (plus its
``resources/protocols/<name>.yaml``).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(available_methods())}")
    return _REGISTRY[name]


_import_all()
