"""A user's own model class: ``--model path/to/file.py:factory`` or ``--model package.module:factory``.

The factory is any callable that returns a ``torch.nn.Module`` (a class, or a function building one), called
with the recipe's ``model.kwargs``. Importing the file runs its code, exactly as ``python file.py`` would: only
name files you trust.

Example:
    >>> model = build_from_factory("my_models.py:make_net", {"num_classes": 44})
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError

_FIX = "give --model FILE.py:NAME or package.module:NAME, where NAME returns a torch.nn.Module"


def resolve_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names; one-line errors for a bad spec, a missing file or name, or an import failure."""
    if ":" not in spec or not spec.rsplit(":", 1)[1]:
        raise CheckpointError(f"--model {spec!r} does not name a factory (expected FILE.py:NAME or module:NAME)", fix=_FIX)
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or where.startswith("."):
        path = Path(where)
        if not path.is_file():
            raise CheckpointError(f"model file {where} not found", fix="check the path (relative to the current directory)")
        module_name = f"deploykit_user_model_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:
            sys.modules.pop(module_name, None)
            raise CheckpointError(f"importing model file {where} failed: {type(err).__name__}: {_one_line(err)}",
                                  fix="run `python " + where + "` to see the full error") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise CheckpointError(f"cannot import model module {where!r} ({_one_line(err)})",
                                  fix="install the package that defines it, or give FILE.py:NAME") from None
        except Exception as err:
            raise CheckpointError(f"importing model module {where!r} failed: {type(err).__name__}: {_one_line(err)}",
                                  fix=f"python -c 'import {where}' shows the full error") from None
    factory = getattr(module, name, None)
    if factory is None:
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, public, n=3)
        raise CheckpointError(f"{where} has no {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""),
                              fix=_FIX)
    if not callable(factory):
        raise CheckpointError(f"{spec} is a {type(factory).__name__}, not a callable", fix=_FIX)
    return factory


def build_from_factory(spec: str, kwargs: dict | None = None):
    """Call the factory ``spec`` names with ``kwargs``; the result must be an ``nn.Module``."""
    import torch

    factory = resolve_factory(spec)
    try:
        model = factory(**(kwargs or {}))
    except Exception as err:
        raise CheckpointError(f"{spec}({_kwargs(kwargs)}) raised {type(err).__name__}: {_one_line(err)}",
                              fix="check model.kwargs in the recipe against the factory's parameters") from None
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"{spec}({_kwargs(kwargs)}) returned a {type(model).__name__}, not a torch.nn.Module",
                              fix=_FIX)
    return model


def _kwargs(kwargs: dict | None) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (kwargs or {}).items())


def _one_line(err: Any) -> str:
    return " ".join(str(err).split()).rstrip(".")[:200]
