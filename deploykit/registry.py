"""A tiny name -> object registry; stages and backends register themselves here.

Tests parametrize over ``registry.names()`` so that adding an entry adds its tests.

Example:
    >>> STAGES = Registry("stage")
    >>> @STAGES.register("fuse_bn")
    ... class FuseBN: ...
    >>> STAGES.get("fuse_bn").__name__
    'FuseBN'
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, TypeVar

from .errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, modules: tuple[str, ...] = ()):
        self.kind = kind
        self._items: dict[str, T] = {}
        # Modules imported on first lookup, so that registering does not force heavy imports at
        # `import deploykit` time (stage modules only import torch inside their run()).
        self._modules = modules
        self._loaded = not modules

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for mod in self._modules:
                importlib.import_module(mod)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(self._items))}"
            raise RecipeError(f"unknown {self.kind} {name!r}", fix=hint)
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items
