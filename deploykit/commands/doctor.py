"""`deploykit doctor`: what this machine can run (CPU flags, runtimes, GPU stack) and how to get what is missing.

Example:
    $ deploykit doctor
    $ deploykit doctor --json
"""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    from ..backends import BACKENDS

    # the runtimes named in the help are the registered ones; each contributes its own checks
    app.command("doctor", help=f"Report CPU features, the runtimes ({', '.join(BACKENDS.names())}) with their "
                               "GPU stack, nvidia-modelopt and BentoML, and how to get what is missing.")(doctor)


def doctor(json_out: bool = typer.Option(False, "--json", help="print the checks as JSON")) -> None:
    """Report CPU features, the registered runtimes with their GPU stack, nvidia-modelopt and BentoML."""
    from ..doctor import as_dict, run_checks

    checks = run_checks()
    if json_out:
        typer.echo(json.dumps(as_dict(checks), indent=2, default=str))
        return
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok " if c.ok else "-- "
        typer.echo(f"{mark}{c.name:<{width}}  {c.version or '':<12} {c.detail}".rstrip())
        if not c.ok:
            typer.echo(f"   {'':<{width}}  why: {c.why}")
            typer.echo(f"   {'':<{width}}  fix: {c.fix}")
