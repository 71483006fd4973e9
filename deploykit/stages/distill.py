"""Knowledge-distillation fine-tuning of the (pruned) model, with the untouched original as teacher.

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
        model, res = fit_distill(state.model, state.teacher, state.data.train, state.preprocessing, self.config,
                                 log=state.log, tag="distill")
        state.model, state.weights_changed = model, True
        # the guard may judge quantization on these train images: held out from fine-tuning, never the eval split
        state.validation_indices = res.val_indices
        facts = {"best_epoch": res.best_epoch, "val_top1": res.best["top1"], "val_macro_f1": res.best["macro_f1"],
                 "history": res.history, "train_images": res.train_images, "val_images": int(len(res.val_indices)),
                 "stopped_early": res.stopped_early, "resumed_from_epoch": res.resumed_from,
                 "world_size": res.world_size, "balance": self.config.balance}
        if timm_arch(model):
            save_pruned(model, state.workdir / DISTILLED_FILE, in_chans=state.preprocessing.channels,
                        model_kwargs=state.model_kwargs)
            facts["file"] = DISTILLED_FILE
        return facts
