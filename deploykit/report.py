"""report.json / report.md for a compression run, and the summary table printed at the end.

Example:
    >>> print(render_markdown(report))
"""

from __future__ import annotations

from typing import Any

REPORT_SCHEMA = 1


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _timing_cell(rec: dict | None, fallback: Any = None) -> str:
    """'4.12 [4.05, 4.30] n=15': the median, its 95% interval and how many timed runs (one harness record)."""
    if not rec:
        return _fmt(fallback)
    lo, hi = rec.get("p50_interval", [None, None])
    return f"{rec['p50']:.2f} [{_fmt(lo)}, {_fmt(hi)}] n={rec['runs']}"


def summary_rows(report: dict) -> list[list[str]]:
    """One row per model: name, backend, precision, top-1, macro-F1, latency per batch size, size."""
    rows = []
    for key, m in report["models"].items():
        lat = m.get("latency_ms", {})
        rows.append([key, m["backend"], m["precision"], _fmt(m.get("top1")), _fmt(m.get("macro_f1")),
                     *[_fmt(lat.get(f"bs{b}_p50")) for b in report.get("latency_batch_sizes", [])],
                     _fmt(m.get("size_mb"))])
    return rows


def summary_header(report: dict) -> list[str]:
    return ["model", "backend", "precision", "top-1 %", "macro-F1 %",
            *[f"bs{b} p50 ms" for b in report.get("latency_batch_sizes", [])], "size MB"]


def render_markdown(report: dict) -> str:
    head = summary_header(report)
    lines = [f"# deploykit report: {report.get('checkpoint', '')}", "",
             f"Recipe `{report.get('recipe')}`, target `{report.get('target')}`, data `{report['data'].get('name')}` "
             f"({report['data'].get('calibration_images')} calibration images, "
             f"{report['data'].get('eval_images')} evaluation images).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(report)]
    lines += ["", "Latency detail (median [95% interval] n=runs, the same records as the runtime table): "
              + "; ".join(f"{key} " + ", ".join(f"{b} {_timing_cell(t)}" for b, t in m.get("timing", {}).items())
                          for key, m in report["models"].items() if m.get("timing"))]
    fid = report.get("fidelity", {})
    lines += ["", f"Fidelity (compressed vs original, {fid.get('inputs', '?')} inputs): top-1 agreement "
              f"{_fmt(fid.get('top1_agreement'), 3)}%, max |logit diff| {_fmt(fid.get('max_abs_logit_diff'), 4)}, "
              f"SQNR {_fmt(fid.get('sqnr_db'), 1)} dB."]
    lines += [""] + [f"- {n}" for n in report.get("notes", [])]
    pc = report.get("per_class")
    if pc:
        lines += ["", "## Per-class F1 (sorted by change)", "",
                  "| class | support | F1 original | F1 compressed | change |", "|---|---|---|---|---|"]
        for r in pc:
            lines.append(f"| {r['class']} | {r['support']} | {_fmt(r['f1_original'])} | {_fmt(r['f1_compressed'])} "
                         f"| {r['f1_change']:+.2f} |")
    sel = report.get("stage_facts", {}).get("select_runtime", {})
    if sel.get("candidates"):
        sizes = sorted({k for c in sel["candidates"] for k in c.get("latency_ms", {})}, key=lambda k: int(k[2:]))
        budget = sel.get("budget") or {}
        against = (f" Accuracy budget against the {sel['drops_vs']}: top-1 drop <= {budget['max_top1_drop']}"
                   + (f", macro-F1 drop <= {budget['max_macro_f1_drop']}" if budget.get("max_macro_f1_drop") is not None
                      else "") + " points." if budget and sel.get("drops_vs") else "")
        lines += ["", "## Runtime chosen by measurement", "", f"**{sel['chosen']}**: {sel.get('reason', '')}.{against}",
                  "",
                  "Latency: median ms [95% interval on the median] n=timed runs; a candidate that could not be the "
                  "fastest stopped being timed early. x reference: latency / the reference's at each batch size, "
                  "the median of per-round ratios (what the choice compares). Timing stopped: "
                  + "; ".join(f"{k}: {v}" for k, v in sel.get("timing_stopped", {}).items()) + ".", "",
                  "| variant | " + " | ".join(f"{b} ms" for b in sizes) + " | x reference | top-1 % | agreement % | "
                  "verdict |", "|---|" + "---|" * (len(sizes) + 4)]
        for c in sel["candidates"]:
            lat = [_timing_cell(c.get("timing", {}).get(b), c.get("latency_ms", {}).get(b)) for b in sizes]
            rel = " / ".join(_fmt((c.get("vs_reference") or {}).get(b), 3) for b in sizes)
            lines.append(f"| {c['name']} | " + " | ".join(lat) + f" | {rel} | {_fmt(c.get('top1'))} | "
                         f"{_fmt(c.get('top1_agreement'))} | {c.get('verdict', '')} |")
        for name, b in sel.get("baselines", {}).items():
            lat = [_timing_cell(b.get("timing", {}).get(k), b.get("latency_ms", {}).get(k)) for k in sizes]
            lines.append(f"| {name} (baseline) | " + " | ".join(lat) + " | | | | |")
    lines += _latency_target_lines(report.get("stage_facts", {}).get("prune", {}).get("latency"),
                                   report.get("backed_off"))
    tp = report.get("stage_facts", {}).get("tta_policy")
    if tp and tp.get("policy"):
        pol = tp["policy"]
        lines += ["", "## Test-time augmentation served by default", "",
                  f"**{pol['mode']}**" + (f": views {', '.join(pol['views'])}" if pol["mode"] != "none" else "")
                  + f". {pol.get('reason', '')}." + (f" Chosen on {tp['chosen_on']} evaluation images." if
                                                   tp.get("chosen_on") else "")]
        held = tp.get("held_out")
        if held:
            lines += ["", f"On the other {held['images']} evaluation images (not used to choose):", "",
                      "| TTA | top-1 % | macro-F1 % | model views per image | fixed vs none | broken vs none |",
                      "|---|---|---|---|---|---|"]
            for k in ("none", "policy", "all"):
                r = held[k]
                lines.append(f"| {k if k != 'policy' else 'the policy (' + pol['mode'] + ')'} | {_fmt(r['top1'])} | "
                             f"{_fmt(r['macro_f1'])} | {r['mean_views']:.2f} | {r['fixed']} | {r['broken']} |")
        if pol.get("curves"):
            lines += ["", "![accuracy vs views](tta_policy.png)"]
    if report.get("forgetting"):
        from .forgetting import forgetting_markdown

        lines += ["", forgetting_markdown(report["forgetting"]).rstrip()]
    if "accuracy_guard" in report.get("stage_facts", {}):
        from .guard import sensitivity_markdown

        lines += ["", sensitivity_markdown(report["stage_facts"]["accuracy_guard"]).rstrip()]
    cmp = report.get("stage_facts", {}).get("qat", {}).get("qat_vs_ptq")
    if cmp:
        verdict = "QAT beat PTQ" if cmp["qat_beat_ptq"] else "QAT did not beat PTQ"
        lines += ["", f"## QAT vs PTQ ({cmp['images']} images, {cmp['split']}): {verdict}", "",
                  "| model | top-1 % | macro-F1 % |", "|---|---|---|"]
        lines += [f"| {k.upper()} | {_fmt(cmp[k]['top1'])} | {_fmt(cmp[k]['macro_f1'])} |" for k in ("fp32", "ptq", "qat")]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s['name']} | {s['seconds']:.2f} |" for s in report.get("stages", [])]
    env = report.get("environment", {})
    if env:
        lines += ["", "Measured on: " + ", ".join(f"{k} {v}" for k, v in env.items())]
    return "\n".join(lines) + "\n"


def print_summary(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: don't squeeze the table into 80 columns
            console = Console(width=140)
    table = Table(title=f"deploykit: {report.get('checkpoint')} ({report.get('recipe')})")
    for h in summary_header(report):
        table.add_column(h, justify="left" if h in ("model", "backend", "precision") else "right")
    for r in summary_rows(report):
        table.add_row(*r)
    console.print(table)
    fid = report.get("fidelity", {})
    console.print(f"top-1 agreement {_fmt(fid.get('top1_agreement'), 3)}%  "
                  f"max |logit diff| {_fmt(fid.get('max_abs_logit_diff'), 4)}")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")


def _latency_target_lines(lat: dict | None, backed_off: list | None) -> list[str]:
    """The prune stage's latency target: what the sweep predicted and what was measured, trial by trial."""
    lines = []
    for b in backed_off or []:
        change = b.get("change") or f"pruning {b['prune_before']} -> {b['prune_after']}"  # older reports: pruning only
        lines += ["", f"**Backed off**: {b['missed']}; re-ran with {change}."]
    if not lat:
        return lines
    met = "met" if lat.get("met") else "not met"
    if lat.get("cost") == "plan":  # prune.plan: a recorded allocation replayed, no sweep to show
        return lines + ["", f"## Pruned by a given plan, timed against {lat['target']} on {lat['runtime']}, batch "
                            f"{lat['batch_size']}: {met}", "",
                        f"Measured {lat['measured_ratio']:.3f}x of the unpruned {lat['unpruned_ms']:.3f} ms "
                        f"({lat.get('clock', 'wall')} time per call). Ratios pruned: "
                        + ", ".join(f"{k} {v:.2f}" for k, v in lat["unit_ratios"].items()) + "."]
    lines += ["", f"## Pruned to a latency target ({lat['target']} on {lat['runtime']}, batch {lat['batch_size']}: "
                  f"{met})", "",
              f"Unpruned {lat['unpruned_ms']:.3f} ms ({lat.get('clock', 'wall')} time per call). Each trial pruned "
              "the blocks by the sweep's allocation and was timed beside the unpruned model; predicted = the sweep's "
              "additive estimate, measured = pruned / unpruned median in that run.", "",
              "| trial | predicted | measured | unpruned ms | pruned ms |", "|---|---|---|---|---|"]
    for i, t in enumerate(lat.get("trials", []), 1):
        lines.append(f"| {i} | {t['predicted_ratio']:.3f}x | {t['measured_ratio']:.3f}x | {t['unpruned_ms']:.3f} | "
                     f"{t['pruned_ms']:.3f} |")
    output_cost = lat.get("cost") == "output"
    lines += ["", "| block | latency saved at half its channels | "
                  + ("output KL (class-balanced)" if output_cost else "weight mass lost") + " | ratio pruned |",
              "|---|---|---|---|"]
    for u in lat.get("sweep", []):
        cost = f"{u['cost']:.4f}" if output_cost else f"{u['cost']:.1%}"
        lines.append(f"| {u['unit']} | {u['saving']:.1%} | {cost} | "
                     f"{lat.get('unit_ratios', {}).get(u['unit'], 0.0):.2f} |")
    return lines
