"""One small name → object registry for every pluggable piece: losses, gate groupings, rollout engines, teacher
scorers, tasks and the diagnostic's losses.

An entry is the object itself or, to keep heavy imports lazy (``import opd_lab`` never imports vLLM), a
``"module:attribute"`` string resolved on first :meth:`Registry.get`. A miss lists the valid names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one ``kind`` (used in error messages: "unknown loss 'x'; available: [...]")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T | str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@LOSSES.register("lsm")``."""
        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T | str) -> None:
        """Register ``obj`` (or a lazy ``"module:attribute"`` path) under ``name``; names are unique."""
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = obj

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; available: {self.names()}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attr = entry.split(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
