"""Method registry: name → class. Each module in this package defines one method.

A method says how the last ViT block computes (and, for SFP, which earlier layers it reads);
windows, fusion, refinement and the decision rule are shared (``pearl.segmentor``).
Each module registers its class with ``@register``; the modules are found and imported the first
time the registry is asked (never while this package is still being initialised), so adding a
method is adding one file plus its ``resources/protocols/<name>.yaml``.
"""
from __future__ import annotations

from ..protocols import method_facts
from ..registry import Registry
from .base import Method

_REGISTRY: Registry[Method] = Registry("method", __name__)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``, with the facts of its protocol
    file (``pearl.protocols.method_facts``: default pa / tlp / arch, query·key term)."""
    for name, value in method_facts(cls.name)._asdict().items():
        setattr(cls, name, value)
    return _REGISTRY.register(cls)


def available_methods() -> list[str]:
    return _REGISTRY.names()


def get_method(name: str) -> type[Method]:
    return _REGISTRY.get(name)
