"""`deploykit serve`: put an artifact into the BentoML model store, or serve one.

Example:
    $ deploykit serve build ckpt.deploykit                 # -> deploykit-classifier:<version>
    $ deploykit serve run ckpt.deploykit --port 3000       # = DEPLOYKIT_ARTIFACT=... bentoml serve deploykit.serving:Classifier
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import DeployKitError

serve_app = typer.Typer(no_args_is_help=True, help="Serve artifacts with BentoML (model store, HTTP server).")


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")


@serve_app.command("build")
def build(
    artifact: Path = typer.Argument(..., help="artifact directory written by `deploykit compress`"),
    name: str = typer.Option("deploykit-classifier", help="BentoML model name"),
) -> None:
    """Import ARTIFACT into the BentoML model store (checksums verified); prints the tag to serve."""
    import os

    from ..cli import fail

    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    try:
        from ..serving.store import import_artifact

        tag = import_artifact(artifact, name=name)
    except DeployKitError as err:
        fail(err)
        return
    typer.echo(tag)
    typer.echo(f"serve it:  DEPLOYKIT_MODEL={tag} bentoml serve deploykit.serving:Classifier", err=True)


@serve_app.command("run")
def run(
    artifact: Path = typer.Argument(..., help="artifact directory written by `deploykit compress`"),
    port: int = typer.Option(3000, help="TCP port"),
    host: str = typer.Option("127.0.0.1", help="bind address (0.0.0.0 to accept remote clients)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads of the model worker (DEPLOYKIT_THREADS)"),
    tta: Optional[str] = typer.Option(None, help="TTA views, e.g. original,hflip,scale:0.9,scale:1.1 or none"),
) -> None:
    """Serve ARTIFACT over HTTP: `bentoml serve deploykit.serving:Classifier` with the environment set."""
    import os
    import subprocess
    import sys

    from ..artifact import Artifact
    from ..cli import fail

    try:
        Artifact.open(artifact)
        if tta is not None:
            from ..serving.tta import parse_views

            parse_views(tta)
    except DeployKitError as err:
        fail(err)
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True", "DEPLOYKIT_ARTIFACT": str(artifact.resolve())}
    if threads:
        env["DEPLOYKIT_THREADS"] = str(threads)
    if tta is not None:
        env["DEPLOYKIT_TTA"] = tta
    cmd = [sys.executable, "-m", "bentoml", "serve", "deploykit.serving:Classifier", "--port", str(port),
           "--host", host]
    raise typer.Exit(subprocess.call(cmd, env=env))
