"""Refiner registry: name → class, one module per refinement (``pearl.refine.base.Refiner``).

Each module registers its class with ``@register``; the modules are found and imported the first
time the registry is asked, so adding a refinement is adding one file (and its parameters in
``pearl/params.py``: the on/off switch named as the refiner, and its settings).
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from ..params import build_config
from .base import Refiner, RefinerContext

__all__ = ["Refiner", "RefinerContext", "available_refiners", "build_refiners", "register"]

_REGISTRY: dict[str, type[Refiner]] = {}


def register(cls: type[Refiner]) -> type[Refiner]:
    if cls.name in _REGISTRY:
        raise ValueError(f"refiner {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


@functools.lru_cache(maxsize=None)
def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available_refiners() -> list[str]:
    """The registered refiners in the order they run."""
    _discover()
    return [cls.name for cls in sorted(_REGISTRY.values(), key=lambda cls: (cls.order, cls.name))]


def build_refiners(params: dict, context: RefinerContext) -> list[Refiner]:
    """The refiners switched on in the resolved ``params``, each built with its config, in order."""
    return [cls(build_config(cls.Config, params, cls.config_prefix), context)
            for cls in (_REGISTRY[name] for name in available_refiners()) if params[cls.name]]
