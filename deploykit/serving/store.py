"""Artifacts in the BentoML model store: import one (so `bentoml build` packages it), find one to serve.

Example:
    >>> tag = import_artifact("ckpt.deploykit")          # 'deploykit-classifier:<version>'
    $ DEPLOYKIT_MODEL=deploykit-classifier:latest bentoml serve deploykit.serving:Classifier
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ArtifactError

DEFAULT_MODEL_NAME = "deploykit-classifier"


def artifact_env() -> str | None:
    """The artifact directory named by DEPLOYKIT_ARTIFACT (it wins over the model store), or None."""
    return os.environ.get("DEPLOYKIT_ARTIFACT") or None


def model_tag() -> str:
    """The store model to serve when DEPLOYKIT_ARTIFACT is unset (env DEPLOYKIT_MODEL)."""
    return os.environ.get("DEPLOYKIT_MODEL", f"{DEFAULT_MODEL_NAME}:latest")


def import_artifact(path: str | Path, name: str = DEFAULT_MODEL_NAME) -> str:
    """Copy a verified artifact directory into the BentoML model store; returns its tag "name:version".

    The manifest's sha256 of every file is checked first, so a damaged artifact never enters the store.
    """
    import bentoml

    from ..artifact import Artifact

    art = Artifact.open(path)
    bad = art.verify()
    if bad:
        raise ArtifactError(f"artifact {path} does not match its manifest: {', '.join(bad)}",
                            fix="re-run `deploykit compress`")
    rt = art.runtime
    labels = {"deploykit": "artifact", "backend": str(rt.get("backend")), "precision": str(rt.get("precision"))}
    metadata = {"source": str(Path(path).resolve()), "runtime": rt,
                "class_names": art.preprocessing.class_names,
                "input_size": list(art.preprocessing.input_size)}
    # bentoml.models.create writes into a temporary directory and only saves on a clean exit
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        for name_ in sorted(os.listdir(art.path)):
            src = art.path / name_
            if src.is_file():
                shutil.copy2(src, Path(model.path) / name_)
    return str(model.tag)


def stored_artifact_dir(stored_model) -> Path:
    """The artifact directory inside a resolved BentoML store model (what BentoModel resolves to)."""
    return Path(stored_model.path)
