"""Pick the CPU runtime by measurement: candidates are timed side by side, the fastest within budget ships.

Candidates are the registered runtime variants (``deploykit.variants``, declared by each backend module) whose
model an earlier stage wrote: the float export always gives ``onnxruntime-fp32`` (the reference) and
``openvino-fp32``; ``quantize_onnx`` adds ``onnxruntime-int8`` and ``openvino-qdq``; ``quantize_openvino`` adds
``openvino-int8``; ``qat`` adds ``onnxruntime-qat`` and ``openvino-qat``. Each names the FP32 variant it must beat.

Measured with the one harness (``deploykit.measure``): every candidate (and PyTorch eager, as a baseline) is timed
in alternating blocks with early stopping; then the FP32 reference is evaluated, and candidates are evaluated
fastest first until the chosen one has met the accuracy budget (``evaluate: all`` evaluates every one). What was
measured stays in ``state.measured``, so the report shows these same numbers.

Rules (``choose_runtime``, pure and tested on recorded numbers): a variant is eligible when it meets the
accuracy budget and is no slower than its FP32 counterpart at any timed batch size; the eligible one with
the lowest score wins (score = geometric mean over batch sizes of latency / reference latency, or one
batch size's latency). Latency relative to the reference is paired by round (``measure.Ratio``), not a ratio
of medians: the shared machines change speed between rounds. ``force`` overrides the choice but the table still
shows every number.

Example:
    >>> choose_runtime(rows, reference="onnxruntime-fp32")["chosen"]
    'openvino-int8'
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from ..errors import DeployKitError, RecipeError
from .config import StageConfig
from ..variants import REFERENCE
from .base import PipelineState, RuntimeCandidate, RuntimeChoice, Stage, register
from .state import Measurements, Route

TORCH = "torch-eager-fp32"  # timed beside the candidates as a baseline; never a candidate itself
OBJECTIVES = ("balanced", "latency", "throughput", "per_batch")


def choose_runtime(rows: list[dict], *, reference: str = REFERENCE, objective: str = "balanced",
                   force: str | None = None, tie: float = 0.05, force_by_batch: dict[int, str] | None = None) -> dict:
    """Choose among measured candidates; pure function of the numbers in ``rows``.

    Args:
        rows: one dict per candidate with ``name``, ``counterpart`` (name or None), ``meets_budget`` (bool),
            ``latency_ms`` ({"bs1": ms, "bs32": ms, ...}, medians) and optionally ``vs_reference`` ({"bs1": latency /
            the reference's, paired by round (``measure.Ratio``)}); without it the medians' ratio is used.
        reference: the row every score is relative to (ONNX Runtime FP32).
        objective: "balanced" (geometric mean over batch sizes of latency / reference; a variant must beat its
            FP32 counterpart at every size), "latency" (smallest batch only), "throughput" (largest batch only),
            "per_batch" (the fastest eligible variant at each batch size, each only where it beats its
            counterpart: ``by_batch`` names one per size, ``chosen`` is the largest size's).
        force: a row name to ship whatever the numbers say.
        tie: per_batch ships one variant unless another is faster at some size by more than this fraction (a
            second runtime has to earn its memory and load time).
        force_by_batch: {batch size: row name} to route whatever the numbers say (``chosen`` = the largest size's).
    Returns:
        {"chosen": name, "reason": str, "verdicts": {name: "eligible" | why not}, "scores": {name: float}}, plus
        "by_batch" ({"bs1": name, ...}) for per_batch when the sizes are served by different variants.

    Example:
        >>> choose_runtime([{"name": "onnxruntime-fp32", "counterpart": None, "meets_budget": True,
        ...                  "latency_ms": {"bs1": 10.0}}])["chosen"]
        'onnxruntime-fp32'
    """
    by_name = {r["name"]: r for r in rows}
    if reference not in by_name:
        raise ValueError(f"reference {reference!r} was not measured (have {sorted(by_name)})")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} not one of {', '.join(OBJECTIVES)}")
    ref = by_name[reference]["latency_ms"]
    keys = sorted(ref, key=lambda k: int(k[2:]))  # "bs1" < "bs32"

    def rel(row: dict, k: str) -> float:
        """Latency relative to the reference at ``k``: paired by round where measured so (a machine changing speed
        between rounds cancels), else the medians' ratio."""
        paired = (row.get("vs_reference") or {}).get(k)
        return paired if paired is not None else row["latency_ms"][k] / ref[k]

    if objective == "latency":
        keys = keys[:1]
    elif objective == "throughput":
        keys = keys[-1:]

    scores, verdicts, usable = {}, {}, {}
    for r in rows:
        lat = r["latency_ms"]
        scores[r["name"]] = round(math.exp(sum(math.log(rel(r, k)) for k in keys) / len(keys)), 4)
        cp = by_name.get(r["counterpart"]) if r.get("counterpart") else None
        # "did not pay" is judged on the batch sizes the objective counts: a batch-32 service does not care
        # that OpenVINO loses at batch 1 (balanced counts every measured size, so it must win at each; per_batch
        # serves a variant only at the sizes where it wins)
        judged = keys if objective in ("latency", "throughput") else sorted(lat, key=lambda k: int(k[2:]))
        slower = [k for k in judged if cp is not None and k in cp["latency_ms"] and rel(r, k) > rel(cp, k)]
        partial = objective == "per_batch"  # the others ship one variant for every size: it must win at each
        usable[r["name"]] = ([k for k in keys if k not in slower] if r["meets_budget"] and (partial or not slower)
                             else [])
        why_slower = (f"slower than its FP32 counterpart {cp['name']} at "
                      + ", ".join(f"{k} ({lat[k]:.2f} vs {cp['latency_ms'][k]:.2f} ms, "
                                  f"{rel(r, k) / rel(cp, k):.2f}x its time)" for k in slower)) if slower else ""
        if not r["meets_budget"]:
            note = f" ({r['budget_note']})" if r.get("budget_note") else ""
            verdicts[r["name"]] = "outside the accuracy budget" + note
        elif not usable[r["name"]]:
            verdicts[r["name"]] = why_slower + ": did not pay"
        elif slower:  # per_batch only: it may serve the sizes where it wins
            verdicts[r["name"]] = f"eligible at {', '.join(usable[r['name']])} only ({why_slower})"
        else:
            verdicts[r["name"]] = "eligible"

    for forced in ([force] if force is not None else []) + list((force_by_batch or {}).values()):
        if forced not in by_name:
            raise RecipeError(f"select_runtime force={forced!r} is not among the measured candidates "
                              f"{sorted(by_name)}",
                              fix="pick one of those names, or build its model with the stage that makes it")
    if force is not None:
        note = "" if verdicts[force] == "eligible" else f"; WARNING: it is {verdicts[force]}"
        return {"chosen": force, "reason": f"forced by the recipe (force: {force}){note}", "verdicts": verdicts,
                "scores": scores}
    if force_by_batch:
        by_batch = {f"bs{bs}": n for bs, n in sorted(force_by_batch.items())}
        notes = "".join(f"; WARNING: {n} is {verdicts[n]}" for n in dict.fromkeys(by_batch.values())
                        if verdicts[n] != "eligible")
        return {"chosen": by_batch[max(by_batch, key=lambda k: int(k[2:]))], "verdicts": verdicts, "scores": scores,
                "reason": f"forced by the recipe (force_by_batch: {by_batch}){notes}", "by_batch": by_batch}

    eligible = [r["name"] for r in rows if usable[r["name"]]]
    if not eligible:  # the reference itself failed the budget: nothing safe to choose but the float reference
        return {"chosen": reference, "reason": "no candidate met the budget; shipping the FP32 reference",
                "verdicts": verdicts, "scores": scores}
    if objective == "per_batch":
        return _per_batch_choice(by_name, eligible, usable, keys, rel, reference, tie, verdicts, scores)
    # min() keeps the first of equal scores, and rows come simplest-first, so a tie goes to the simpler variant
    best = min(eligible, key=lambda n: scores[n])
    what = {"balanced": f"geometric-mean latency over {', '.join(keys)}", "latency": f"{keys[0]} latency",
            "throughput": f"{keys[0]} latency"}[objective]
    speed = ", ".join(f"{k} {by_name[best]['latency_ms'][k]:.2f} ms ({1 / rel(by_name[best], k):.2f}x "
                      f"{reference})" for k in sorted(by_name[best]["latency_ms"], key=lambda k: int(k[2:])))
    return {"chosen": best, "reason": f"fastest of {len(eligible)} eligible variants by {what}: {speed}",
            "verdicts": verdicts, "scores": scores}


def _per_batch_choice(by_name: dict, eligible: list[str], usable: dict, keys: list[str], rel, reference: str,
                      tie: float, verdicts: dict, scores: dict) -> dict:
    """per_batch: the fastest usable variant at each size; one variant for all sizes unless another is faster by
    more than ``tie`` somewhere (the largest size's winner is the one kept, the others are measured against it)."""
    fastest = {k: min((n for n in eligible if k in usable[n]), key=lambda n: rel(by_name[n], k), default=None)
               for k in keys}
    main = fastest[keys[-1]] or min(eligible, key=lambda n: scores[n])
    by_batch = {}
    for k in keys:
        best = fastest[k]
        keep = best is None or (k in usable[main] and rel(by_name[main], k) <= (1 + tie) * rel(by_name[best], k))
        by_batch[k] = main if keep else best
    speed = ", ".join(f"{k} {n} {by_name[n]['latency_ms'][k]:.2f} ms ({1 / rel(by_name[n], k):.2f}x {reference})"
                      for k, n in by_batch.items())
    routed = len(set(by_batch.values())) > 1
    what = "the fastest eligible variant at each batch size" if routed else \
        f"fastest eligible at every batch size (within {tie:.0%})"
    return {"chosen": main, "reason": f"{what}: {speed}", "verdicts": verdicts, "scores": scores,
            **({"by_batch": by_batch} if routed else {})}


def budget_notes(fid: dict, top1_drop: float | None, *, retrained: bool, min_top1_agreement: float,
                 min_sqnr_db: float, max_top1_drop: float, macro_f1_drop: float | None = None,
                 max_macro_f1_drop: float | None = None) -> list[str]:
    """Why a candidate is outside the accuracy budget (empty list: within it).

    ``top1_drop`` is None without labelled data. Near-tied logits (random weights on synthetic inputs) make argmax
    agreement flip on noise, so a low agreement only disqualifies when the SQNR is low too (as in quantize_onnx).
    A ``retrained`` (QAT) model was fine-tuned and is *meant* to differ from the FP32 model: with labels only its
    accuracy counts (tf_efficientnet_lite0 on Fashion-MNIST-LT: 82% agreement at +6 points of top-1).

    Example:
        >>> budget_notes({"top1_agreement": 82.0, "sqnr_db": 10.7}, -6.3, retrained=True, min_top1_agreement=90,
        ...              min_sqnr_db=20, max_top1_drop=0.5)
        []
    """
    notes = []
    judged_on_accuracy_only = retrained and top1_drop is not None
    if (not judged_on_accuracy_only and fid["top1_agreement"] < min_top1_agreement
            and fid["sqnr_db"] < min_sqnr_db):
        notes.append(f"agreement {fid['top1_agreement']:.2f}% < {min_top1_agreement}% "
                     f"at SQNR {fid['sqnr_db']:.1f} dB < {min_sqnr_db}")
    if top1_drop is not None and top1_drop > max_top1_drop:
        notes.append(f"top-1 drop {top1_drop:.2f} > {max_top1_drop} points")
    if macro_f1_drop is not None and max_macro_f1_drop is not None and macro_f1_drop > max_macro_f1_drop:
        notes.append(f"macro-F1 drop {macro_f1_drop:.2f} > {max_macro_f1_drop} points")
    return notes


def chain_budget_miss(rows: list[dict], decision: dict, reference: str = REFERENCE) -> str | None:
    """Why the whole chain missed its budget (None: the chosen variant meets it).

    With drops measured against the original model, ``choose_runtime`` falls back to the float ``reference`` (the
    pruned, distilled model exported) when no variant is eligible; when that reference is outside the budget too,
    no runtime can bring the accuracy back: the pruning or the fine-tuning has to change, not the runtime.

    Example (recorded: each step within a 1.0 budget, the chain 1.14 points over it):
        >>> rows = [{"name": "onnxruntime-fp32", "meets_budget": False, "budget_note": "top-1 drop 1.14 > 1.0"}]
        >>> chain_budget_miss(rows, {"chosen": "onnxruntime-fp32"})
        'top-1 drop 1.14 > 1.0'
    """
    ref = next(r for r in rows if r["name"] == reference)
    if decision["chosen"] != reference or ref["meets_budget"]:
        return None
    return ref["budget_note"] or "no candidate met the accuracy budget"


class ChainBudgetMissed(DeployKitError):
    """The final model is outside the accuracy budget measured against the original (``select_runtime``).

    ``near_miss``: every missed drop was within twice its budget (what ``deploykit.back_off`` reads)."""

    near_miss: bool = False


def near_miss(row: dict, max_top1_drop: float, max_macro_f1_drop: float | None) -> bool:
    """Whether each of ``row``'s drops is at most twice its budget (a miss by no more than the budget again).

    Example:
        >>> near_miss({"top1_drop": 0.75, "macro_f1_drop": 0.4}, 0.5, 1.0), near_miss({"top1_drop": 3.2}, 0.5, None)
        (True, False)
    """
    pairs = [(row.get("top1_drop"), max_top1_drop), (row.get("macro_f1_drop"), max_macro_f1_drop)]
    return all(drop <= 2 * budget for drop, budget in pairs if drop is not None and budget is not None)


def _known_variants(names: list[str] | None) -> list[str] | None:
    """Each name must be a registered runtime variant (pydantic wants a ValueError, the registry raises its own)."""
    from ..variants import RUNTIME_VARIANTS

    for n in names or ():
        try:
            RUNTIME_VARIANTS.get(n)
        except RecipeError as err:
            raise ValueError(f"{err.problem}; {err.fix}") from None
    return names


@register("select_runtime")
class SelectRuntime(Stage):
    """Evaluate and time every CPU runtime variant; ship the fastest one within the accuracy budget."""

    class Config(StageConfig):
        candidates: list[str] | None = Field(None, description="runtime variants to measure (deploykit.variants); "
                                                                 "None = every variant whose model exists")
        force: str | None = Field(None, description="ship this runtime variant whatever the measurements say")
        force_by_batch: dict[int, str] | None = Field(None, description="route these batch sizes to these runtime "
                                                                        "variants whatever the measurements say")
        objective: Literal["balanced", "latency", "throughput", "per_batch"] = Field(
            "balanced", description="balanced: one runtime, geometric mean over batch sizes; latency / throughput: "
                                    "one runtime, the smallest / largest batch size; per_batch: the fastest at each "
                                    "batch size, served by the artifact's batch router (deploykit.backends."
                                    "batch_router)")
        bf16: Literal["auto", "always", "never"] = Field("auto",
                                                         description="auto: a candidate only where the CPU has BF16")
        max_top1_drop: float = Field(0.5, ge=0, description="points of top-1 below the original allowed (with --data)")
        max_macro_f1_drop: float | None = Field(None, ge=0, description="points of macro-F1 below the original "
                                                                        "allowed (with --data); None = not checked")
        # One budget for the chain: when prune/distill changed the weights, drops are measured against the original
        # model, not against the pruned model's own FP32 export (two steps each within a 1.0 budget lost 1.14).
        drops_vs: Literal["original", "fp32_export"] = Field(
            "original", description="what accuracy drops are measured against once earlier stages changed the "
                                    "weights: the original model (one budget for the whole chain) or the FP32 "
                                    "export of the changed model")
        min_top1_agreement: float = Field(90.0, ge=0, le=100, description="% top-1 agreement with FP32 required "
                                                                          "(unless SQNR >= min_sqnr_db)")
        min_sqnr_db: float = Field(20.0, description="SQNR vs FP32 that excuses a low agreement on near-tied logits")
        eval_images: int | None = Field(None, ge=1, description="evaluation images per candidate; None = all")
        batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
        rounds: int = Field(6, ge=1, description="most timing rounds per batch size; each times every candidate "
                                                 "still in the race once, in a block")
        block_runs: int = Field(5, ge=1, description="most timed runs per candidate per block (a block holds about "
                                                     "0.3 s of runs, at least one)")
        warmup_runs: int = Field(1, ge=0, description="untimed runs per candidate before timing a batch size "
                                                      "(at least one: first calls compile and allocate)")
        time_budget_s: float = Field(20.0, gt=0, description="timing budget for all batch sizes together: stop after "
                                                             "the round that passes it (at least 2 rounds each)")
        decide_within: float = Field(0.05, ge=0, description="stop timing once every candidate still in the race is "
                                                             "within this fraction of the fastest (a tie)")
        early_stop: bool = Field(True, description="stop timing a candidate once it cannot be the fastest, and all "
                                                   "timing once the winner is decided; False: every round for all")
        evaluate: Literal["needed", "all"] = Field("needed", description="needed: evaluate the reference and then "
                                                   "candidates fastest first until one meets the budget; all: every "
                                                   "candidate")
        threads: int | None = Field(None, ge=1, description="None = physical cores")
        time_torch: bool = Field(True, description="also time PyTorch eager FP32 (the original model) as a baseline")

        @field_validator("candidates")
        @classmethod
        def _candidates_known(cls, v):
            return _known_variants(v)

        @field_validator("force")
        @classmethod
        def _force_known(cls, v):
            return v if v is None else _known_variants([v])[0]

        @field_validator("force_by_batch")
        @classmethod
        def _routes_known(cls, v):
            if v is not None and (not v or min(v) < 1):
                raise ValueError("force_by_batch maps batch sizes >= 1 to runtime variants, e.g. "
                                 "{1: onnxruntime-int8, 32: openvino-int8}")
            return v if v is None else dict(zip(v, _known_variants(list(v.values()))))

    def run(self, state: PipelineState) -> dict:
        from ..evaluate import classification_metrics, fidelity
        from ..measure import array_batches, logits_for, time_batch_sizes

        c = self.config
        if state.target != "cpu":
            return {"skipped": f"target {state.target!r} is not cpu"}
        if state.onnx_fp32_path is None:
            raise RecipeError("select_runtime needs the float ONNX model",
                              fix="put export_onnx before it in the recipe")
        cands = state.runtime_candidates(c.candidates, bf16=_wants_bf16(c.bf16))
        backends, cannot_run = {}, {}
        probe = state.check_inputs()[:1]
        for cand in cands:
            try:
                backends[cand.name] = cand.create(state, c.threads)
                backends[cand.name].run(probe)  # some refusals only come at the first inference
            except Exception as err:  # e.g. a BF16 hint the CPU advertises but its kernels refuse: skip, say why
                backends.pop(cand.name, None)
                if cand.name == REFERENCE:
                    raise
                cannot_run[cand.name] = f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"
                state.log(f"[yellow]select_runtime: {cand.name} cannot run here ({cannot_run[cand.name]})[/]")
        cands = [cand for cand in cands if cand.name in backends]
        timed = {n: be.run for n, be in backends.items()}
        if c.time_torch:
            from ..backends import create_backend

            backends[TORCH] = create_backend("torch", state.teacher, threads=c.threads)
            timed[TORCH] = backends[TORCH].run

        # Speed first (cheap with early stopping), then accuracy only where it can change the choice.
        timings = time_batch_sizes(timed, state.check_inputs(), c.batch_sizes, max_rounds=c.rounds,
                                   block_runs=c.block_runs, warmup=c.warmup_runs,
                                   time_budget_s=c.time_budget_s, decide_within=c.decide_within,
                                   eliminate=c.early_stop)
        latency = {n: {f"bs{bs}": run.records[n].p50 for bs, run in timings.items()} for n in timed}
        # each candidate's latency / the reference's, paired by round: what the choice compares (measure.Ratio)
        vs_ref = {n: {f"bs{bs}": run.ratio(n, REFERENCE).value for bs, run in timings.items()} for n in timed}
        timing = {n: {f"bs{bs}": run.records[n].to_dict() for bs, run in timings.items()} for n in timed}

        labels = None
        if state.data is not None:
            images = state.data.eval.head(c.eval_images, seed=0)
            labels = images.labels

            def batches():  # the timed batch size: the runtimes hold memory for it already (256 took 4.9 GB)
                return (x for x, _ in images.batches(state.preprocessing, max(c.batch_sizes)))
        else:
            x_check = state.check_inputs()

            def batches():
                return array_batches(x_check, 64)

        out: dict[str, np.ndarray] = {}

        def evaluate(names: list[str]) -> None:
            todo = {n: backends[n] for n in names if n not in out}
            if todo:
                out.update(logits_for(todo, batches()))

        ref_top1 = ref_f1 = None

        def row_for(cand) -> dict[str, Any]:
            v = cand.variant
            row: dict[str, Any] = {
                "name": cand.name, "backend": v.backend, "model": cand.path.name, "precision": v.precision,
                "settings": v.settings, "counterpart": v.counterpart, "latency_ms": latency[cand.name],
                "vs_reference": vs_ref[cand.name],
                "timing": timing[cand.name],
                "top1_agreement": None, "sqnr_db": None, "top1": None, "evaluated": cand.name in out,
                "meets_budget": True, "budget_note": "", "runtime": backends[cand.name].info(),
            }
            if TORCH in latency:
                row["speedup_vs_torch_eager"] = {k: round(vs_ref[TORCH][k] / vs_ref[cand.name][k], 3)
                                                 for k in latency[cand.name]}
            if cand.name not in out:
                return row
            fid = fidelity(out[REFERENCE], out[cand.name])
            row.update(top1_agreement=fid["top1_agreement"], sqnr_db=fid["sqnr_db"])
            if labels is not None:
                m = classification_metrics(out[cand.name], labels, n_classes)
                row.update(top1=m["top1"], macro_f1=round(m["macro_f1"], 4), top1_drop=round(ref_top1 - m["top1"], 4),
                           macro_f1_drop=round(ref_f1 - m["macro_f1"], 4))
            # judged against the original on labels, the accuracy drops decide (as for QAT); agreement with the
            # changed model's own FP32 export is reported, not gated
            notes = budget_notes(fid, row.get("top1_drop"), retrained=v.retrained or against == TORCH,
                                 min_top1_agreement=c.min_top1_agreement, min_sqnr_db=c.min_sqnr_db,
                                 max_top1_drop=c.max_top1_drop, macro_f1_drop=row.get("macro_f1_drop"),
                                 max_macro_f1_drop=c.max_macro_f1_drop)
            row.update(meets_budget=not notes, budget_note="; ".join(notes))
            return row

        evaluate([cand.name for cand in cands] if c.evaluate == "all" else [REFERENCE])
        n_classes = int(out[REFERENCE].shape[1])
        against = REFERENCE
        if labels is not None and state.weights_changed and c.drops_vs == "original":
            if TORCH not in backends:
                from ..backends import create_backend

                backends[TORCH] = create_backend("torch", state.teacher, threads=c.threads)
            evaluate([TORCH])
            against = TORCH
        if labels is not None:
            base = classification_metrics(out[against], labels, n_classes)
            ref_top1, ref_f1 = base["top1"], base["macro_f1"]
        # Until the chosen candidate was evaluated: evaluate it and choose again (unevaluated ones count as in budget,
        # so each pass either confirms the fastest or rules it out).
        while True:
            rows = [row_for(cand) for cand in cands]
            decision = choose_runtime(rows, objective=c.objective, force=c.force, tie=c.decide_within,
                                      force_by_batch=c.force_by_batch)
            shipped = {decision["chosen"], *decision.get("by_batch", {}).values()}
            if shipped <= out.keys():
                break
            evaluate(sorted(shipped - out.keys()))
        for row in rows:
            row["verdict"] = decision["verdicts"][row["name"]]
            if not row["evaluated"] and row["verdict"] == "eligible":
                row["verdict"] = "not evaluated: a faster candidate met the accuracy budget"
            row["score"] = decision["scores"][row["name"]]
        forced = c.force is not None or c.force_by_batch
        miss = chain_budget_miss(rows, decision) if against == TORCH and not forced else None
        if miss is not None:
            err = ChainBudgetMissed(
                f"the compressed model is outside the accuracy budget against the original, even in float "
                f"({REFERENCE}: {miss}; original top-1 {ref_top1:.2f}, macro-F1 {ref_f1:.2f})",
                fix="prune less (a larger --target-latency, a smaller --prune), distill longer, or raise the budget "
                    "(--max-drop / --max-f1-drop)")
            err.near_miss = near_miss(next(r for r in rows if r["name"] == REFERENCE), c.max_top1_drop,
                                      c.max_macro_f1_drop)
            raise err
        by_name = {cand.name: cand for cand in cands}
        chosen = by_name[decision["chosen"]]
        reason = decision["reason"]
        if state.withheld:  # models that failed their own stage's fidelity check never became candidates
            reason += "; not candidates: " + "; ".join(f"{k} ({why})" for k, why in state.withheld.items())
        by_batch = {int(k[2:]): by_name[n] for k, n in decision.get("by_batch", {}).items()}
        self._apply(state, chosen, rows, by_batch)
        state.measured = Measurements(backends=backends, logits=out, labels=labels, timings=timings)
        state.log(f"select_runtime: {chosen.name} ({reason})")
        return {"chosen": chosen.name, "reason": reason, "withheld": dict(state.withheld), "cannot_run": cannot_run,
                **({"by_batch": decision["by_batch"]} if by_batch else {}),
                "objective": c.objective,
                "drops_vs": "original" if against == TORCH else "fp32 export",
                "budget": {"max_top1_drop": c.max_top1_drop, "max_macro_f1_drop": c.max_macro_f1_drop,
                           "against_top1": ref_top1, "against_macro_f1": ref_f1 if labels is not None else None},
                "inputs": int(len(out[REFERENCE])), "inputs_kind": "evaluation images" if labels is not None
                else "held-out synthetic inputs", "threads": backends[REFERENCE].threads, "candidates": rows,
                "timing_stopped": {f"bs{bs}": run.stopped for bs, run in timings.items()},
                "timing_seconds": round(sum(run.seconds for run in timings.values()), 2),
                "baselines": {TORCH: {"latency_ms": latency[TORCH], "timing": timing[TORCH]}} if TORCH in latency
                else {},
                "int8_paid": _int8_paid(rows)}

    @staticmethod
    def _apply(state: PipelineState, chosen: RuntimeCandidate, rows: list[dict],
               by_batch: dict[int, RuntimeCandidate]) -> None:
        """Record the choice. ``runtime.model`` names the file to ship; ``onnx_path`` stays an ONNX file;
        ``runtime.by_batch`` the variant each timed batch size is routed to (empty: one runtime for all)."""
        from .quantize_openvino import model_files

        v = chosen.variant
        files = {v.backend: chosen.path.name}
        # the fastest eligible ONNX for ONNX Runtime, so DEPLOYKIT_BACKEND=onnxruntime still has a model to run
        ort = [r for r in rows if r["backend"] == "onnxruntime" and r["verdict"] == "eligible"]
        if v.backend != "onnxruntime" and ort:
            files["onnxruntime"] = min(ort, key=lambda r: r["score"])["model"]
        routes = {bs: Route(variant=c.name, backend=c.variant.backend, model=c.path.name,
                            precision=c.variant.precision, settings=dict(c.variant.settings),
                            model_files=model_files(c.path)) for bs, c in by_batch.items()}
        state.runtime = RuntimeChoice(backend=v.backend, settings=dict(v.settings), model=chosen.path.name,
                                      variant=chosen.name, files=files, model_files=model_files(chosen.path),
                                      by_batch=routes)
        state.precision = v.precision
        if chosen.path.suffix == ".onnx":
            state.onnx_path = chosen.path
        # else (an IR): onnx_path keeps the latest ONNX, so code that expects model.onnx keeps working


def _wants_bf16(setting: str) -> bool:
    """BF16 candidates: "always", "never", or "auto" = only where the CPU computes BF16 natively."""
    if setting != "auto":
        return setting == "always"
    from ..backends.openvino_backend import cpu_capabilities

    return "BF16" in cpu_capabilities()


def _int8_paid(rows: list[dict]) -> dict[str, bool]:
    """For each INT8/BF16 variant: was it faster than its FP32 counterpart at every batch size?"""
    by = {r["name"]: r for r in rows}
    return {r["name"]: all(v < by[r["counterpart"]]["latency_ms"][k] for k, v in r["latency_ms"].items())
            for r in rows if r["precision"] != "fp32" and r["counterpart"] in by}
