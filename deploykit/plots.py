"""Accuracy-vs-latency Pareto plot (matplotlib, imported only when a plot is drawn).

Example:
    >>> pareto_plot([{"name": "onnxruntime/int8", "latency_ms": 0.4, "accuracy": 90.1}, ...], "pareto.png")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower-or-equal latency AND higher-or-equal accuracy), fastest first.

    Example:
        >>> pareto_front([(1.0, 90.0), (2.0, 89.0), (3.0, 92.0)])
        [0, 2]
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _overlap(c, w, h, others) -> float:
    return sum(max(0.0, min(c[0] + w, o[2]) - max(c[0], o[0])) * max(0.0, min(c[1] + h, o[3]) - max(c[1], o[1]))
               for o in others)


def _label_offsets(xs, ys, labels: list[str], ax, fontsize: float) -> list[tuple[float, float, bool]]:
    """Offsets (points) of each label's lower-left corner, chosen so labels overlap neither each other nor markers.

    The third item says whether the label sits away from its point (then a leader line is drawn).

    Greedy: points left to right; for each, the first candidate position (right, left, above, below,
    then further away) whose box is clear of every marker and every label already placed, inside the axes.
    """
    px = ax.figure.dpi / 72.0
    line_h, char_w, gap, r = fontsize * 1.25 * px, fontsize * 0.6 * px, 8 * px, 9 * px
    disp = ax.transData.transform(list(zip(xs, ys)))
    frame = ax.get_window_extent()
    markers = [(x - r, y - r, x + r, y + r) for x, y in disp]
    boxes: list[tuple[float, float, float, float]] = []
    offsets = [(0.0, 0.0, False)] * len(xs)

    def clear(b) -> bool:
        inside = frame.x0 <= b[0] and b[2] <= frame.x1 and frame.y0 <= b[1] and b[3] <= frame.y1
        return inside and not any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in markers + boxes)

    for i in sorted(range(len(xs)), key=lambda k: (disp[k][0], disp[k][1])):
        lines = labels[i].split("\n")
        w, h = max(len(t) for t in lines) * char_w, len(lines) * line_h
        x, y = disp[i]
        candidates = [(x + gap, y - h / 2), (x - gap - w, y - h / 2), (x - w / 2, y + gap), (x - w / 2, y - gap - h),
                      (x + gap, y + gap), (x + gap, y - gap - h), (x - gap - w, y + gap), (x - gap - w, y - gap - h)]
        for k in range(1, 25):  # then further up/down on either side
            for dy in (k * line_h, -k * line_h):
                candidates += [(x + gap, y - h / 2 + dy), (x - gap - w, y - h / 2 + dy)]
        k = next((k for k, c in enumerate(candidates) if clear((c[0], c[1], c[0] + w, c[1] + h))), None)
        if k is None:  # crowded: the candidate overlapping least
            k = min(range(len(candidates)), key=lambda j: _overlap(candidates[j], w, h, markers + boxes))
        chosen = candidates[k]
        boxes.append((chosen[0], chosen[1], chosen[0] + w, chosen[1] + h))
        offsets[i] = ((chosen[0] - x) / px, (chosen[1] - y) / px, k >= 8)
    return offsets


def pareto_plot(points: Sequence[dict], path: str | Path, title: str = "accuracy vs latency",
                subtitle: str = "", xlabel: str = "latency p50 (ms, log scale)", ylabel: str = "top-1 accuracy (%)",
                group_key: str | None = None) -> Path:
    """Scatter one labelled point per variant, draw the Pareto front, save a PNG atomically.

    Args:
        points: dicts with ``name``, ``latency_ms``, ``accuracy`` (optional ``label`` shown instead of the name,
            and ``group_key`` for the colour).
    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    path = Path(path)
    xs = [float(p["latency_ms"]) for p in points]
    ys = [float(p["accuracy"]) for p in points]
    names = [str(p.get("label") or p["name"]) for p in points]
    front = pareto_front(list(zip(xs, ys)))

    groups = sorted({str(p.get(group_key, "")) for p in points}) if group_key else [""]
    # grouped plots (e.g. a sweep) put the legend outside, right of the axes
    fig, ax = plt.subplots(figsize=(11.5 if len(groups) > 1 else 9, 6.2 if len(groups) > 1 else 5.6), dpi=130)
    cmap = plt.get_cmap("tab10")
    for gi, g in enumerate(groups):
        idx = [i for i, p in enumerate(points) if not group_key or str(p.get(group_key, "")) == g]
        ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], s=60, color=cmap(gi % 10), zorder=3,
                   label=g or None, edgecolors="black", linewidths=0.6)
    if len(front) > 1:
        fx, fy = [xs[i] for i in front], [ys[i] for i in front]
        ax.step(fx, fy, where="post", color="tab:red", lw=1.5, ls="--", zorder=2)
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], s=160, facecolors="none", edgecolors="tab:red",
               linewidths=1.5, zorder=4, label="on the Pareto front (nothing both faster and more accurate)")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_locator(LogLocator(subs=(2, 3, 5)))
    ax.xaxis.set_minor_formatter(plain)
    span = max(xs) / min(xs) if min(xs) > 0 else 10
    ax.set_xlim(min(xs) / (1.25 if span > 1.5 else 1.5), max(xs) * (2.6 if span > 1.5 else 3.0))
    lo, hi = min(ys), max(ys)
    pad = max(0.5, (hi - lo) * 0.15)
    ax.set_ylim(lo - pad, hi + pad * 1.6)
    fig.canvas.draw()
    fontsize = 8.5
    labels = [f"{names[i]}\n{xs[i]:.3g} ms, {ys[i]:.2f}%" if len(points) <= 10 else names[i] for i in range(len(xs))]
    for i, (dx, dy, far) in enumerate(_label_offsets(xs, ys, labels, ax, fontsize)):
        # grouped plots colour each label like its group's markers, so a label is matched to its point
        colour = cmap(groups.index(str(points[i].get(group_key, ""))) % 10) if len(groups) > 1 else "black"
        ax.annotate(labels[i], (xs[i], ys[i]), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    va="bottom", ha="left", fontweight="bold" if i in front else "normal", color=colour,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6} if far else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles and len(groups) > 1:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, borderaxespad=0)
    elif handles:
        ax.legend(loc="lower right", fontsize=8.5)
    return _save(fig, path)


def tta_curve_plot(policy: dict, path: str | Path) -> Path:
    """Top-1 vs mean model views per image as each gate's threshold moves (the best view subset), with the chosen
    policy marked; ``policy`` is ``TTAPolicy.to_dict()``. Saved atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=130)
    for gate, pts in (policy.get("curves") or {}).items():
        ax.plot([p["mean_views"] for p in pts], [p["top1"] for p in pts], lw=1.4, label=f"gate: {gate}")
    curves = list((policy.get("curves") or {}).values())
    if curves:  # a curve ends with every image escalated, i.e. the best subset's whole gain
        base = curves[0][-1]["top1"] - policy["best_gain_top1"]
        ax.axhline(base, color="0.6", lw=0.8, ls=":", label="no TTA")
        ax.scatter([policy["mean_views"]], [base + policy["gain_top1"]], s=120, facecolors="none",
                   edgecolors="tab:red", linewidths=1.5, zorder=4, label="chosen policy")
    ax.set_xlabel("mean model views per image")
    ax.set_ylabel("top-1 (%), images the policy was chosen on")
    ax.set_title(f"TTA policy: {policy['mode']}, {policy['mean_views']:.2f} views/image, "
                 f"{policy['gain_top1']:+.2f} of {policy['best_gain_top1']:+.2f} points", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8.5)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Lay out, write to a hidden temp file, rename into place (never a half-written PNG), close the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
