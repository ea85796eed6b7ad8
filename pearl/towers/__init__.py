"""Tower registry: the implementations of ``pearl.towers.base.Tower``, one module each.

``tower_for(visual)`` wraps a model's image tower in the first registered implementation that
``matches`` it; adding a tower family is adding one file with a ``@register``-ed class. The modules
are found and imported the first time the registry is asked.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil

from ..errors import ConfigError
from .base import AttentionBlock, Tower, Trunk

__all__ = ["AttentionBlock", "Tower", "Trunk", "available_towers", "register", "tower_for"]

_REGISTRY: dict[str, type[Tower]] = {}


def register(cls: type[Tower]) -> type[Tower]:
    if cls.name in _REGISTRY:
        raise ValueError(f"tower {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


@functools.lru_cache(maxsize=None)
def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def available_towers() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def tower_for(visual) -> Tower:
    """The registered tower implementation that computes ``visual`` (a model's image tower)."""
    _discover()
    for cls in _REGISTRY.values():
        if cls.matches(visual):
            return cls(visual)
    raise ConfigError(f"image tower {type(visual).__name__} is not supported; supported: "
                      f"{', '.join(available_towers())} (docs/architecture.md §2 says how to add one)")
