"""A leaf registry (timm's pattern): name → class, one module per entry in a package, the modules
imported the first time the registry is asked (never while the package is still being initialised).
The methods, the image towers and the refiners are such registries (docs/architecture.md §1)."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str) -> None:
        self.kind, self.package = kind, package
        self._classes: dict[str, type[T]] = {}
        self._discovered = False

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: ``cls`` under ``cls.name``."""
        if cls.name in self._classes:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
        self._classes[cls.name] = cls
        return cls

    def _discover(self) -> None:
        if not self._discovered:
            self._discovered = True
            for info in pkgutil.iter_modules(importlib.import_module(self.package).__path__):
                if info.name != "base":
                    importlib.import_module(f"{self.package}.{info.name}")

    def classes(self) -> list[type[T]]:
        """The registered classes, sorted by name."""
        self._discover()
        return [self._classes[name] for name in sorted(self._classes)]

    def names(self) -> list[str]:
        return [cls.name for cls in self.classes()]

    def get(self, name: str) -> type[T]:
        """The class registered as ``name``; a ValueError naming the valid ones otherwise."""
        self._discover()
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._classes[name]
