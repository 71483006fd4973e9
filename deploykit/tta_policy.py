"""Which test-time augmentation to serve, chosen from recorded logits: none, selective, or every view.

Given each view's logits on held-out labelled images (views[0] = the original), ``choose_policy`` measures every
view subset's top-1 gain over the original alone, then, for each gate (the original view's max softmax
probability, or its top-2 margin) and each threshold, the accuracy of running the subset's extra views only on
the images the gate calls uncertain, against the mean number of views per image that costs. It picks the cheapest
policy that keeps at least ``keep`` (90%) of the best subset's gain, and "none" when no subset gains at all: TTA is
never served at a cost without a gain.

Example:
    >>> policy = choose_policy({"original": l0, "hflip": l1, "scale:0.9": l2, "scale:1.1": l3}, labels)
    >>> policy.mode, policy.views, policy.gate, policy.threshold, policy.mean_views
    ('selective', ('original', 'hflip'), 'margin', 0.31, 1.12)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Literal

import numpy as np

from .serving.tta import softmax

GATES = ("max_prob", "margin")


def gate_scores(logits: np.ndarray, gate: str) -> np.ndarray:
    """Confidence of each image from its original view: high = confident (no extra views needed)."""
    p = softmax(np.asarray(logits, dtype=np.float64))
    if gate == "max_prob":
        return p.max(-1)
    if gate == "margin":
        top2 = np.sort(p, axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    raise ValueError(f"gate {gate!r} not one of {GATES}")


@dataclass
class TTAPolicy:
    """What the service runs by default. ``threshold``: an image whose gate score is below it gets ``views``."""

    mode: Literal["none", "selective", "all"]
    views: tuple[str, ...] = ("original",)
    gate: str | None = None
    threshold: float | None = None
    gain_top1: float = 0.0          # points over the original view alone, on the images the policy was chosen on
    mean_views: float = 1.0         # model views per image, averaged
    escalated: float = 0.0          # fraction of images given the extra views
    best_views: tuple[str, ...] = ("original",)
    best_gain_top1: float = 0.0
    images: int = 0
    reason: str = ""
    subsets: list[dict] = field(default_factory=list)   # every subset: views, gain_top1, fixed, broken
    curves: dict[str, list[dict]] = field(default_factory=dict)  # gate -> [{threshold, mean_views, top1}]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["views"], d["best_views"] = list(self.views), list(self.best_views)
        return d

    def summary(self) -> dict:
        """The fields a client or a report line needs (no curves)."""
        return {"mode": self.mode, "views": list(self.views), "gate": self.gate, "threshold": self.threshold,
                "gain_top1": self.gain_top1, "mean_views": self.mean_views, "escalated": self.escalated,
                "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> "TTAPolicy":
        d = dict(d)
        d["views"], d["best_views"] = tuple(d.get("views", ("original",))), tuple(d.get("best_views", ("original",)))
        return cls(**d)

    def escalate(self, original_logits: np.ndarray) -> np.ndarray:
        """Which images get the extra views (a boolean per image)."""
        n = len(original_logits)
        if self.mode == "none" or len(self.views) < 2:
            return np.zeros(n, bool)
        if self.mode == "all":
            return np.ones(n, bool)
        return gate_scores(original_logits, self.gate) < self.threshold


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100)


def choose_policy(logits: dict[str, np.ndarray], labels: np.ndarray, *, keep: float = 0.9,
                  min_gain_images: int = 1) -> TTAPolicy:
    """The cheapest TTA policy keeping ``keep`` of the best view subset's top-1 gain (see the module docstring).

    Args:
        logits: view name -> (N, classes) logits, the original view first (its key is "original").
        labels: (N,) true classes.
        min_gain_images: the best subset must fix this many more images than it breaks, else "none".
    """
    views = list(logits)
    if views[0] != "original":
        raise ValueError("the first view must be 'original'")
    labels = np.asarray(labels)
    n = len(labels)
    base = logits["original"]
    base_ok = base.argmax(1) == labels
    base_top1 = float(base_ok.mean() * 100)
    extra = views[1:]

    subsets = []
    for k in range(1, len(extra) + 1):
        for combo in combinations(extra, k):
            s = ("original", *combo)
            mean = np.mean([logits[v] for v in s], axis=0)
            ok = mean.argmax(1) == labels
            subsets.append({"views": list(s), "gain_top1": round(float(ok.mean() * 100) - base_top1, 4),
                            "fixed": int((ok & ~base_ok).sum()), "broken": int((~ok & base_ok).sum()),
                            "_ok": ok})
    best = max(subsets, key=lambda r: (r["fixed"] - r["broken"], -len(r["views"])), default=None)
    public = [{k: v for k, v in r.items() if k != "_ok"} for r in subsets]
    if best is None or best["fixed"] - best["broken"] < min_gain_images:
        gain = best["gain_top1"] if best else 0.0
        return TTAPolicy("none", images=n, best_views=tuple(best["views"]) if best else ("original",),
                         best_gain_top1=gain, subsets=public,
                         reason=f"TTA does not help this model: the best view subset changes top-1 by {gain:+.2f} "
                                f"points on {n} held-out images, so no extra views are served")
    best_gain = best["fixed"] - best["broken"]  # in images: exact, no float thresholds

    # Every subset that could qualify, every gate, every threshold between two observed gate scores.
    candidates = []
    curves: dict[str, list[dict]] = {}
    for r in subsets:
        if r["fixed"] - r["broken"] < keep * best_gain:
            continue
        cost = len(r["views"]) - 1
        candidates.append((1 + cost, best_gain if r is best else r["fixed"] - r["broken"], "all", r, None, None, 1.0))
        for gate in GATES:
            score = gate_scores(base, gate)
            order = np.argsort(score)          # least confident first
            ok_sorted = r["_ok"][order].astype(int) - base_ok[order].astype(int)
            net = np.concatenate([[0], np.cumsum(ok_sorted)])  # net images fixed when the first k are escalated
            s_sorted = score[order]
            # escalating the k least confident = threshold at the (k+1)-th score; equal scores cannot be split
            splits = [k for k in range(1, n + 1) if k == n or s_sorted[k] != s_sorted[k - 1]]
            thr = {k: float(s_sorted[k]) if k < n else float("inf") for k in splits}
            if r is best:
                curves[gate] = [{"threshold": thr[k], "mean_views": round(1 + cost * k / n, 4),
                                 "top1": round(base_top1 + 100 * net[k] / n, 4)} for k in splits]
            k = next((k for k in splits if net[k] >= keep * best_gain), None)  # the fewest escalations that do
            if k is not None:
                candidates.append((1 + cost * k / n, int(net[k]), gate, r, thr[k], k, k / n))
    mv, net_k, gate, r, thr, k, frac = min(candidates, key=lambda c: (c[0], -c[1], len(c[3]["views"])))
    mode = "all" if gate == "all" else "selective"
    gain = round(100 * net_k / n, 4)
    reason = (f"keeps {net_k} of the best subset's {best_gain} net images fixed ({gain:+.2f} of {best['gain_top1']:+.2f}"
              f" points) at {mv:.2f} views per image"
              + (f": extra views {', '.join(r['views'][1:])} only where the {gate} gate is below {thr:.4g} "
                 f"({frac:.1%} of images)" if mode == "selective" else f": views {', '.join(r['views'])} for every image"))
    return TTAPolicy(mode, tuple(r["views"]), gate if mode == "selective" else None, thr if mode == "selective" else None,
                     gain_top1=gain, mean_views=round(mv, 4), escalated=round(frac, 4), best_views=tuple(best["views"]),
                     best_gain_top1=best["gain_top1"], images=n, reason=reason, subsets=public, curves=curves)


def apply_policy(policy: TTAPolicy, run, x: np.ndarray, make_views) -> tuple[np.ndarray, np.ndarray]:
    """Logits of ``x`` under ``policy``: one call on the originals, one on the uncertain images' extra views.

    Args:
        run: array -> logits (a Backend's ``run``).
        make_views: (x, views) -> the views of every image stacked image-major (``serving.tta.make_views``).
    Returns:
        (logits averaged over each image's views, views used per image).
    """
    base = np.asarray(run(x))
    esc = np.flatnonzero(policy.escalate(base))
    more = run(make_views(x[esc], policy.views[1:])) if len(esc) else None
    return merge_views(base, esc, more, len(policy.views) - 1)


def merge_views(base: np.ndarray, esc: np.ndarray, more, n_extra: int) -> tuple[np.ndarray, np.ndarray]:
    """The originals' logits with the escalated images' extra-view logits averaged in (the second call's answer,
    image-major, ``n_extra`` views each; None when nothing escalated), and the views used per image. The service's
    async path and ``apply_policy`` both end here."""
    used = np.ones(len(base), dtype=np.int64)
    if len(esc):
        more = np.asarray(more).reshape(len(esc), n_extra, -1)
        base = np.asarray(base).astype(np.float32, copy=True)
        base[esc] = (base[esc] + more.sum(1)) / (1 + n_extra)
        used[esc] = 1 + n_extra
    return base, used
