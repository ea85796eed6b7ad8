"""Refiner registry: name → class, one module per refinement (``pearl.refine.base.Refiner``).

Each module registers its class with ``@register``; the modules are found and imported the first
time the registry is asked, so adding a refinement is adding one file (and its parameters in
``pearl/params.py``: the on/off switch named as the refiner, and its settings).
"""
from __future__ import annotations

from ..params import build_config
from ..registry import Registry
from .base import Refiner, RefinerContext

__all__ = ["Refiner", "RefinerContext", "available_refiners", "build_refiners", "get_refiner", "register"]

_REGISTRY: Registry[Refiner] = Registry("refiner", __name__)
register = _REGISTRY.register


def _in_order() -> list[type[Refiner]]:
    return sorted(_REGISTRY.classes(), key=lambda cls: (cls.order, cls.name))


def available_refiners() -> list[str]:
    """The registered refiners in the order they run."""
    return [cls.name for cls in _in_order()]


def get_refiner(name: str) -> type[Refiner]:
    """The refiner class registered as ``name``."""
    return _REGISTRY.get(name)


def build_refiners(params: dict, context: RefinerContext) -> list[Refiner]:
    """The refiners switched on in the resolved ``params``, each built with its config, in order."""
    return [cls(build_config(cls.Config, params, cls.config_prefix), context) for cls in _in_order()
            if params[cls.name]]
