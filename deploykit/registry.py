"""A tiny name -> object registry; stages, backends, runtime variants and datasets register themselves here.

Tests parametrize over ``registry.names()`` so that adding an entry adds its tests. A registry given a
``package`` imports every module of that package on first lookup, so adding an entry is adding one module:
no list elsewhere has to learn its name.

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
import pkgutil
from typing import Callable, Generic, TypeVar

from .errors import RecipeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str | None = None, skip: tuple[str, ...] = ()):
        self.kind = kind
        self._items: dict[str, T] = {}
        # The package's modules are imported on first lookup, not at `import deploykit` time: registering
        # must not force heavy imports (entry modules import torch/onnx only inside their functions).
        self._package = package
        self._skip = set(skip)
        self._loaded = package is None

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
            pkg = importlib.import_module(self._package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_") and info.name not in self._skip:
                    importlib.import_module(f"{self._package}.{info.name}")

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

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in registration order (module order within the package, then file order)."""
        self._load()
        return list(self._items.items())

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items
