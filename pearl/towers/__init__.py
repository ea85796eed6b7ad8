"""Tower registry: the implementations of ``pearl.towers.base.Tower``, one module each.

``tower_for(visual)`` wraps a model's image tower in the first registered implementation that
``matches`` it; adding a tower family is adding one file with a ``@register``-ed class. The modules
are found and imported the first time the registry is asked.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import Registry
from .base import AttentionBlock, Tower, TowerConfig, Trunk

__all__ = ["AttentionBlock", "Tower", "TowerConfig", "Trunk", "available_towers", "register", "tower_for"]

_REGISTRY: Registry[Tower] = Registry("tower", __name__)
register = _REGISTRY.register


def available_towers() -> list[str]:
    return _REGISTRY.names()


def tower_for(visual, config: TowerConfig | None = None) -> Tower:
    """The registered tower implementation that computes ``visual`` (a model's image tower), with the
    tower settings ``config`` (defaults: ``TowerConfig()``)."""
    for cls in _REGISTRY.classes():
        if cls.matches(visual):
            return cls(visual, config)
    reasons = [reason for cls in _REGISTRY.classes() if (reason := cls.unsupported(visual))]
    why = f" ({reasons[0]})" if reasons else ""
    raise ConfigError(f"image tower {type(visual).__name__}{why} is not supported; supported: "
                      f"{', '.join(available_towers())} (docs/architecture.md §2 says how to add one)")
