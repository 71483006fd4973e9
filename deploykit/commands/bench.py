"""`deploykit bench`: accuracy-vs-latency table, JSON and Pareto plot; with --baseline, the CI latency gate.

Example:
    $ deploykit bench ckpt.deploykit --backends torch,onnxruntime --batch 1,8,32 --out bench-out
    $ deploykit bench gpu.deploykit --device cuda            # GPU variants, batch 1..1024, CUDA-event latency
    $ deploykit bench ckpt.deploykit --baseline bench/baselines/ref.json --max-slowdown 10%   # exit 0/1/2
    $ deploykit bench ckpt.deploykit --baseline bench/baselines/ref.json --update-baseline
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..benchmark import bench_backends
from ..errors import DeployKitError


def _backends_help() -> tuple[str, str]:
    """(default, help) for --backends, read from the backend registry (and each backend's bench modes)."""
    table = bench_backends()
    default = ",".join(n for n, b in table.items() if b.default)
    opt_in = [f"{n} (GPU)" if b.device == "gpu" else n for n, b in table.items() if not b.default]
    return default, f"comma-separated, from: {', '.join(table)}; the default leaves out {', '.join(opt_in)}"


_BACKENDS_DEFAULT, _BACKENDS_HELP = _backends_help()


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)


def bench(
    artifact: Path = typer.Argument(..., help="artifact directory written by `deploykit compress`"),
    backends: str = typer.Option(_BACKENDS_DEFAULT, help=_BACKENDS_HELP),
    batch: Optional[str] = typer.Option(None, help="comma-separated batch sizes, or auto (powers of two up to "
                                        "--max-batch); default 1,8,32, with --device cuda auto"),
    device: str = typer.Option("cpu", help="cpu, or cuda: the GPU variants (torch-cuda at fp32/fp16/bf16 ...), "
                               "latency from CUDA events, GPU memory; exit 2 where torch sees no GPU"),
    max_batch: int = typer.Option(1024, help="largest batch of --batch auto (a GPU variant stops at the first "
                                  "batch that does not fit in memory)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output directory (default <artifact>.bench)"),
    data: str = typer.Option("auto", help="evaluation data: auto (as the artifact was built), a name/path, or none"),
    eval_images: int = typer.Option(1000, help="evaluation images per variant"),
    runs: int = typer.Option(50, help="timed rounds per batch size (all variants interleaved)"),
    warmup: int = typer.Option(5, help="warm-up rounds per batch size"),
    budget: float = typer.Option(15.0, help="seconds cap for the timed rounds of one batch size"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads (default: physical cores)"),
    no_plot: bool = typer.Option(False, "--no-plot", help="skip the Pareto PNG"),
    plot_metric: str = typer.Option("p50", help="Pareto x axis: p50 (wall latency) or cpu_p50 (CPU time per call, "
                                    "stable on a shared machine)"),
    baseline: Optional[Path] = typer.Option(None, help="gate mode: compare against this baseline JSON"),
    max_slowdown: str = typer.Option("10%", help="gate: tolerated slowdown, e.g. 10%"),
    update_baseline: bool = typer.Option(False, "--update-baseline", help="gate: measure and write a new baseline"),
    gate_seconds: float = typer.Option(3.0, help="gate: seconds of alternating rounds per batch size"),
    gate_threads: int = typer.Option(1, help="gate: threads for model and reference (1 = least noisy when shared)"),
    gate_reference: str = typer.Option("model", help="gate, with --update-baseline: 'model' (copy the deployed model "
                                       "beside the baseline as the reference) or 'synthetic' (a fixed conv net)"),
    gate_clock: str = typer.Option("auto", help="gate, with --update-baseline: 'cpu' (process CPU time: immune to "
                                   "preemption by neighbours), 'wall' (elapsed), 'cuda' (CUDA events), or 'auto' "
                                   "(cuda for a GPU runtime, else wall below 2 ms per call, else cpu)"),
) -> None:
    """Benchmark every variant (accuracy, p50/p90/p99, throughput, memory, size), or gate on a baseline."""
    from ..cli import fail

    try:
        from ..benchmark import check_device

        names = check_device(device, None if backends == _BACKENDS_DEFAULT and device != "cpu" else backends)
        if baseline is not None:  # the gate times the deployed runtime (CUDA events when it runs on a GPU)
            raise typer.Exit(_gate(artifact, baseline, max_slowdown, update_baseline, batch or "1,8,32", out,
                                   gate_seconds, gate_threads, gate_reference, gate_clock))
        if update_baseline:
            raise DeployKitError("--update-baseline needs --baseline FILE", fix="add --baseline bench/baselines/NAME.json")
        from ..benchmark import parse_backends, parse_batches, run_benchmark, write_bench

        batch = batch or ("auto" if device == "cuda" else "1,8,32")
        result = run_benchmark(artifact, parse_backends(names), "auto" if batch == "auto" else parse_batches(batch),
                               data=None if data.lower() == "none" else data, eval_images=eval_images, threads=threads,
                               warmup=warmup, runs=runs, budget_s=budget, log=lambda s: typer.echo(s, err=True),
                               device=device, max_batch=max_batch)
        out = out or artifact.with_name(artifact.name.rstrip("/") + ".bench")
        if plot_metric not in ("p50", "cpu_p50"):
            raise DeployKitError(f"--plot-metric {plot_metric!r} is not p50 or cpu_p50", fix="use --plot-metric cpu_p50")
        paths = write_bench(result, out, plot=not no_plot, metric=plot_metric)
        typer.echo(paths["md"].read_text())
        typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))
    except DeployKitError as err:
        fail(err)


def _gate(artifact: Path, baseline: Path, max_slowdown: str, update: bool, batch: str, out: Optional[Path],
          seconds: float, threads: int, reference: str, clock: str) -> int:
    from ..artifact import write_json
    from ..benchmark import parse_batches
    from ..gate import load_baseline, make_baseline, parse_slowdown, run_gate

    if update:
        data = make_baseline(artifact, baseline, parse_batches(batch), threads=threads, seconds=seconds,
                             reference=reference, clock=clock)
        for e in data["entries"]:
            typer.echo(f"[{e['key']}] median ratio model/reference ({e['reference']['kind']}, {e['clock']} clock) "
                       f"{e['median_ratio']:.4f} "
                       f"over {e['rounds']} rounds (model p50 {e['candidate_ms_p50']:.3f} ms, reference p50 "
                       f"{e['reference_ms_p50']:.3f} ms)")
        typer.echo(f"wrote baseline {baseline}")
        return 0
    limit = parse_slowdown(max_slowdown)
    result = run_gate(artifact, load_baseline(baseline), limit, base_dir=baseline.parent, seconds=seconds,
                      log=typer.echo)
    result["baseline"] = str(baseline)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "gate.json", result)
    typer.echo(f"gate: {result['verdict']} (exit {result['exit_code']})")
    return result["exit_code"]
