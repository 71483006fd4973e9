"""The latency gate's baselines: measure and write one (--update-baseline), read and check one, gate on it.

Example:
    >>> make_baseline("a.deploykit", "bench/baselines/a.json", [1])
    >>> result = run_gate("a.deploykit", load_baseline("bench/baselines/a.json"), 0.10, base_dir="bench/baselines")
    >>> result["exit_code"]   # 0 pass, 1 regression, 2 too noisy to decide
    0
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Callable

from .measure import CLOCKS, measure_gate, model_reference
from .stats import GateError, combine, decide

BASELINE_SCHEMA = "deploykit.gate-baseline/1"
GATE_SCHEMA = "deploykit.gate-result/1"


def make_baseline(artifact, path: str | Path, batch_sizes=(1,), *, threads: int = 1, seconds: float = 3.0,
                  reference: str = "model", clock: str = "auto") -> dict:
    """Measure a new gate baseline for the artifact's deployed model and write it (--update-baseline).

    With reference 'model' the deployed model is copied to ``<baseline stem>.reference/`` beside the JSON.
    """
    from ..artifact import Artifact, write_json
    from ..benchmark import parse_batches
    from ..environment import load_average, machine, versions

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if reference == "model":
        spec = model_reference(art, path.parent / f"{path.stem}.reference")
    elif reference == "synthetic":
        spec = {"kind": "synthetic", "repeats": None}
    else:
        raise GateError(f"unknown gate reference {reference!r}", fix="use --gate-reference model or synthetic")
    if clock not in (*CLOCKS, "auto"):
        raise GateError(f"unknown gate clock {clock!r}", fix="use --gate-clock auto, cpu, wall or cuda")
    entries = [measure_gate(art, b, spec, threads=threads, seconds=seconds, base_dir=path.parent, clock=clock)
               for b in parse_batches(list(batch_sizes))]
    data = {"schema": BASELINE_SCHEMA, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "artifact": {"path": str(art.path), "model": art.runtime["model"],
                         "sha256": art.manifest.get("files", {}).get(art.runtime["model"])},
            "machine": machine(), "versions": versions(), "load_average": load_average(),
            "settings": {"threads": threads, "seconds": seconds, "reference": reference, "clock": clock},
            "entries": entries}
    write_json(path, data)
    return data


def load_baseline(path: str | Path) -> dict:
    """Read and check a baseline JSON written by ``make_baseline`` (and its reference model, if any)."""
    import json

    from ..artifact import sha256_file

    path = Path(path)
    fix = "re-create it with --update-baseline"
    if not path.is_file():
        raise GateError(f"baseline {path} not found", fix="create it with --baseline FILE --update-baseline")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GateError(f"baseline {path} is not valid JSON ({err.msg})", fix=fix) from None
    if data.get("schema") != BASELINE_SCHEMA or not data.get("entries"):
        raise GateError(f"{path} is not a deploykit gate baseline (schema {data.get('schema')!r})", fix=fix)
    for e in data["entries"]:
        ref = e.get("reference", {})
        if ref.get("kind") == "model":
            model = path.parent / ref["path"]
            if not model.is_file():
                raise GateError(f"the baseline's reference model {model} is missing", fix=f"commit it, or {fix}")
            if sha256_file(model) != ref.get("sha256"):
                raise GateError(f"the baseline's reference model {model} changed since the baseline was made", fix=fix)
    return data


def run_gate(artifact, baseline: dict, max_slowdown: float, *, base_dir: str | Path = ".",
             seconds: float | None = None, slowdown: float = 0.0, log: Callable[[str], None] = print) -> dict:
    """Measure the artifact against every baseline entry and decide; returns the gate-result dict.

    Args:
        base_dir: the directory of the baseline JSON (its reference model paths are relative to it).
        slowdown: plants an artificial slowdown (bench/gate_proof.py only).
    """
    from ..artifact import Artifact
    from ..environment import load_average, machine

    art = artifact if isinstance(artifact, Artifact) else Artifact.open(artifact)
    warnings = []
    here, there = machine(), baseline.get("machine", {})
    if there and (here.get("cpu"), here.get("cpu_flags")) != (there.get("cpu"), there.get("cpu_flags")):
        warnings.append(f"baseline measured on '{there.get('cpu')}' {there.get('cpu_flags')}, this is '{here.get('cpu')}'"
                        f" {here.get('cpu_flags')}: re-create the baseline on the CI machine type")
    seconds = seconds if seconds is not None else float(baseline.get("settings", {}).get("seconds", 3.0))
    decisions, measured = [], []
    for entry in baseline["entries"]:
        m = measure_gate(art, int(entry["batch"]), entry["reference"], threads=int(entry.get("threads", 1)),
                         seconds=seconds, base_dir=Path(base_dir), slowdown=slowdown, clock=entry.get("clock", "wall"))
        if m["key"] != entry["key"]:
            warnings.append(f"baseline entry {entry['key']} compared with {m['key']} (the deployed runtime changed)")
        d = decide(m["ratios"], entry["ratios"], max_slowdown, key=entry["key"])
        decisions.append(d)
        measured.append({k: v for k, v in m.items() if k != "ratios"})
        log(d.summary())
    for w in warnings:
        log(f"warning: {w}")
    code = combine(decisions)
    return {"schema": GATE_SCHEMA, "exit_code": code, "verdict": {0: "pass", 1: "regression", 2: "undecided"}[code],
            "max_slowdown": max_slowdown, "decisions": [d.to_dict() for d in decisions], "measured": measured,
            "warnings": warnings, "load_average": load_average(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
