"""deploykit: a trained image classifier -> smaller, faster, verified, served.

Importing the package is cheap (no torch, onnxruntime or bentoml): the heavy stacks are imported by
the functions that need them.

Example:
    >>> import deploykit
    >>> res = deploykit.compress("models/resnet10t_fmnist.pth", "int8-ptq", data__name="fashion-mnist")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import DeployKitError
from .recipe import Recipe, list_recipes, load_recipe

__all__ = ["__version__", "compress", "Artifact", "DeployKitError", "Recipe", "list_recipes", "load_recipe"]


def __getattr__(name: str):
    # Lazy: `deploykit.compress` / `deploykit.Artifact` without importing torch at package import.
    if name == "compress":
        from .api import compress

        return compress
    if name == "Artifact":
        from .artifact import Artifact

        return Artifact
    raise AttributeError(f"module 'deploykit' has no attribute {name!r}")
