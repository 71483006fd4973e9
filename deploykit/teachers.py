"""Teachers for knowledge distillation beyond the original model: a k-fold / multi-seed ensemble, and test-time
augmentation, each an ``nn.Module`` that returns averaged logits, so the trainer treats them like any teacher.

Example:
    >>> teacher = EnsembleTeacher([load("fold0.pth"), load("fold1.pth"), load("fold2.pth")])
    >>> teacher = TTATeacher(model, ("original", "hflip", "scale:0.9", "scale:1.1"))
"""

from __future__ import annotations

from typing import Sequence

import torch


class EnsembleTeacher(torch.nn.Module):
    """The mean of several models' logits (a k-fold or multi-seed ensemble)."""

    def __init__(self, models: Sequence[torch.nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = torch.nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


class TTATeacher(torch.nn.Module):
    """A model's logits averaged over test-time augmentation views, made exactly as the service makes them
    (``serving.tta``: horizontal flip; zoom about the centre with Pillow's bilinear weights, as matrices)."""

    def __init__(self, model: torch.nn.Module, views: Sequence[str]):
        super().__init__()
        from .serving.tta import parse_views

        self.model = model
        self.views = parse_views(list(views))

    def _view(self, x: torch.Tensor, view: str) -> torch.Tensor:
        from .serving.tta import _zoom_matrix

        if view == "original":
            return x
        if view == "hflip":
            return x.flip(-1)
        s = float(view.split(":", 1)[1])
        h, w = x.shape[-2:]
        mh = torch.from_numpy(_zoom_matrix(h, s)).to(x.dtype)
        mw = torch.from_numpy(_zoom_matrix(w, s)).to(x.dtype)
        return mh @ x @ mw.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.model(self._view(x, v)) for v in self.views]).mean(0)
