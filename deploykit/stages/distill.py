"""Knowledge-distillation fine-tuning of the (pruned) model, with the untouched original as teacher, or the
original under test-time augmentation (``teacher: tta``), or a k-fold / multi-seed ensemble (``teachers: [...]``).

Runs ``deploykit.training.fit_distill`` on the TRAIN split (a stratified slice of it for validation);
the evaluation split is never touched. The EMA weights with the best validation macro-F1 replace
``state.model``; if the model was pruned, they are saved rebuildable beside the artifact.

Example (recipe):
    stages:
      - prune: {macs_reduction: 0.5}
      - distill: {epochs: 5, balance: sampler}
"""

from __future__ import annotations

from ..errors import DataError
from ..training import DistillConfig
from .base import PipelineState, Stage, register

DISTILLED_FILE = "model.distilled.pth"


@register("distill")
class Distill(Stage):
    """KD fine-tune state.model against state.teacher; see deploykit.training.DistillConfig for options."""

    Config = DistillConfig

    def run(self, state: PipelineState) -> dict:
        from ..data import data_help
        from ..pruned_io import save_pruned, timm_arch
        from ..training import fit_distill

        if state.data is None:
            raise DataError("the distill stage needs labelled training images",
                            fix=f"pass --data ({data_help()})")
        teacher, members = self._teacher(state)
        model, res = fit_distill(state.model, teacher, state.data.train, state.preprocessing, self.config,
                                 log=state.log, tag="distill")
        state.model, state.weights_changed = model, True
        # the guard may judge quantization on these train images: held out from fine-tuning, never the eval split
        state.validation_indices = res.val_indices
        facts = {"best_epoch": res.best_epoch, "val_top1": res.best["top1"], "val_macro_f1": res.best["macro_f1"],
                 "history": res.history, "train_images": res.train_images, "val_images": int(len(res.val_indices)),
                 "stopped_early": res.stopped_early, "resumed_from_epoch": res.resumed_from,
                 "world_size": res.world_size, "balance": self.config.balance, "transfer": self.config.transfer,
                 "teacher": self.config.teacher, "teachers": [str(p) for p in self.config.teachers]}
        if teacher is not state.teacher:  # what the student learned from, on the same held-out train images
            kind = " + ".join(k for k, on in (("ensemble", members), ("TTA", self.config.teacher == "tta")) if on)
            facts["validation"] = self._validation(state, res.val_indices, {
                "original": state.teacher, **{f"teacher {i}": m for i, m in enumerate(members)},
                f"teacher ({kind})": teacher, "student": model})
        if timm_arch(model):
            save_pruned(model, state.workdir / DISTILLED_FILE, in_chans=state.preprocessing.channels,
                        model_kwargs=state.model_kwargs)
            facts["file"] = DISTILLED_FILE
        return facts

    def _teacher(self, state: PipelineState):
        """The teacher the student learns from, and the ensemble's members (empty without ``teachers``)."""
        import torch

        from ..checkpoint import load_checkpoint
        from ..teachers import EnsembleTeacher, TTATeacher

        c, teacher, members = self.config, state.teacher, []
        if c.teachers:
            members = [load_checkpoint(p).model.eval() for p in c.teachers]
            x = torch.from_numpy(state.check_inputs()[:2])
            with torch.inference_mode():
                want = tuple(state.teacher(x).shape)
                for p, m in zip(c.teachers, members):
                    got = tuple(m(x).shape)
                    if got != want:
                        raise DataError(f"ensemble teacher {p} gives logits of shape {got[1:]} for this model's "
                                        f"inputs, the student {want[1:]}",
                                        fix="list checkpoints of the same task (classes and input size) in teachers")
            teacher = EnsembleTeacher(members)
        if c.teacher == "tta":
            teacher = TTATeacher(teacher, c.tta_views)
        return teacher.eval(), members

    @staticmethod
    def _validation(state: PipelineState, indices, models: dict) -> dict:
        """Top-1, macro-F1 and per-class F1 of each model on the train images held out from fine-tuning."""
        import numpy as np

        from ..backends import create_backend
        from ..evaluate import classification_metrics, predict

        val = state.data.train.subset(np.asarray(indices))
        out = {}
        for name, m in models.items():
            logits = predict(create_backend("torch", m), val, state.preprocessing, 256)
            met = classification_metrics(logits, val.labels, len(state.preprocessing.class_names) or
                                         int(logits.shape[1]))
            out[name] = {"top1": met["top1"], "macro_f1": met["macro_f1"], "per_class_f1": met["per_class_f1"]}
        return out
