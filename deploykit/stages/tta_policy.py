"""Choose the test-time augmentation the service runs by default, measured with the shipped runtime.

On a seeded half of the evaluation split the stage scores every view (original, flip, zooms) with the runtime
select_runtime chose, and ``deploykit.tta_policy.choose_policy`` picks none / selective / all; the other half
reports what the policy buys and costs (top-1, macro-F1, images fixed and broken, mean views per image), so the
gain in the report was not measured on the images it was chosen on. The policy is written to the artifact
(``tta_policy.json``) and is what ``deploykit.serving`` runs unless a request says otherwise.

Example (recipe):
    - select_runtime
    - tta_policy: {views: [original, hflip, "scale:0.9", "scale:1.1"], keep: 0.9}
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from .base import PipelineState, Stage, register
from .config import StageConfig

NO_DATA = ("no labelled data: the gain of TTA cannot be measured, so none is served by default (pass --data, or "
           "ask per request with tta=all)")


def view_logits(run, x: np.ndarray, views: tuple[str, ...]) -> np.ndarray:
    """(N, V, classes): every view of every image in one call, as the service batches them."""
    from ..serving.tta import make_views

    out = np.asarray(run(make_views(x, views)))
    return out.reshape(len(x), len(views), -1)


def policy_outcome(policy, per_view: np.ndarray, views: tuple[str, ...], labels: np.ndarray, n_classes: int) -> dict:
    """none / the policy / every view on images the policy was not chosen on: accuracy, cost, fixed and broken."""
    from ..evaluate import classification_metrics

    base = per_view[:, 0]
    esc = policy.escalate(base)
    cols = [views.index(v) for v in policy.views]
    chosen = np.where(esc[:, None], per_view[:, cols].mean(1), base)
    everything = per_view.mean(1)
    base_ok = base.argmax(1) == labels
    out = {}
    for name, logits, mean_views in (("none", base, 1.0), ("policy", chosen, 1 + esc.mean() * (len(cols) - 1)),
                                     ("all", everything, float(len(views)))):
        m = classification_metrics(logits, labels, n_classes)
        ok = logits.argmax(1) == labels
        out[name] = {"top1": m["top1"], "macro_f1": m["macro_f1"], "mean_views": round(float(mean_views), 4),
                     "fixed": int((ok & ~base_ok).sum()), "broken": int((~ok & base_ok).sum())}
    return out


@register("tta_policy")
class TTAPolicyStage(Stage):
    """Choose the default test-time augmentation (none / selective / all) by measurement on held-out images."""

    class Config(StageConfig):
        views: list[str] = Field(default_factory=lambda: ["original", "hflip", "scale:0.9", "scale:1.1"],
                                 description="views to consider; the original always first")
        keep: float = Field(0.9, gt=0, le=1, description="share of the best view subset's gain a policy must keep")
        min_gain_images: int = Field(1, ge=1, description="the best subset must fix this many more held-out images "
                                                          "than it breaks, else no TTA")
        choose_fraction: float = Field(0.5, gt=0, lt=1, description="share of the evaluation split the policy is "
                                                                      "chosen on; the rest reports its effect")
        batch_size: int = Field(32, ge=1)

        @field_validator("views")
        @classmethod
        def _views(cls, v):
            from ..errors import DeployKitError
            from ..serving.tta import parse_views

            try:
                return list(parse_views(v))
            except DeployKitError as err:
                raise ValueError(f"{err.problem}; {err.fix}") from None

    def run(self, state: PipelineState) -> dict:
        from ..tta_policy import TTAPolicy, choose_policy

        c = self.config
        if state.data is None:
            state.tta_policy = TTAPolicy("none", reason=NO_DATA)
            return {"policy": state.tta_policy.to_dict(), "skipped": NO_DATA}
        views = tuple(c.views)
        run = self._shipped(state).run
        ev = state.data.eval
        order = np.random.default_rng(0).permutation(len(ev))
        n_choose = max(1, int(round(len(ev) * c.choose_fraction)))
        parts = {"choose": ev.subset(np.sort(order[:n_choose])), "report": ev.subset(np.sort(order[n_choose:]))}
        per_view = {k: np.concatenate([view_logits(run, x, views) for x, _ in part.batches(state.preprocessing,
                                                                                          c.batch_size)])
                    for k, part in parts.items() if len(part)}
        n_classes = int(per_view["choose"].shape[-1])
        policy = choose_policy({v: per_view["choose"][:, i] for i, v in enumerate(views)}, parts["choose"].labels,
                               keep=c.keep, min_gain_images=c.min_gain_images)
        state.tta_policy = policy
        state.log(f"tta_policy: {policy.mode} ({policy.reason})")
        facts = {"policy": policy.to_dict(), "chosen_on": int(len(parts["choose"])), "views": list(views)}
        if "report" in per_view:
            facts["held_out"] = {"images": int(len(parts["report"])),
                                 **policy_outcome(policy, per_view["report"], views, parts["report"].labels, n_classes)}
        return facts

    @staticmethod
    def _shipped(state: PipelineState):
        """The runtime select_runtime chose, already loaded; else the state's runtime choice, loaded here."""
        if state.measured is not None and state.runtime.variant in state.measured.backends:
            return state.measured.backends[state.runtime.variant]
        rt = state.runtime
        path = state.workdir / rt.model if rt.model else state.onnx_path
        settings = {k: v for k, v in rt.settings.items() if k != "precision"}
        return state.backend(rt.backend, path, precision=state.precision, **settings)
