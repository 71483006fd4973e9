"""Serving: `bentoml serve deploykit.serving:Classifier` (see service.py); tta/decode/store are pure helpers.

Importing ``deploykit.serving`` stays light; ``Classifier`` / ``ClassifierModel`` import BentoML on first use.

Example:
    $ DEPLOYKIT_ARTIFACT=ckpt.deploykit bentoml serve deploykit.serving:Classifier
"""

from __future__ import annotations

__all__ = ["Classifier", "ClassifierModel"]


def __getattr__(name: str):
    if name in __all__:
        from . import service

        return getattr(service, name)
    raise AttributeError(f"module 'deploykit.serving' has no attribute {name!r}")
