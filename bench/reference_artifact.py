"""The benchmarks' shared "serve/measure this artifact, or build one from the reference checkpoint" option.

Example:
    >>> add_artifact_args(parser, "serve this artifact instead of compressing --checkpoint")
    >>> artifact = build_artifact(args, Path(tmp))
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_artifact_args(p: argparse.ArgumentParser, artifact_help: str) -> None:
    """--checkpoint (default: the Fashion-MNIST reference), --artifact, --recipe (default int8-ptq)."""
    p.add_argument("--checkpoint", type=Path, default=ROOT / "models" / "resnet10t_fmnist.pth")
    p.add_argument("--artifact", type=Path, help=artifact_help)
    p.add_argument("--recipe", default="int8-ptq")


def build_artifact(args, workdir: Path) -> Path:
    """``args.artifact``, or ``args.checkpoint`` compressed with ``args.recipe`` on Fashion-MNIST into ``workdir``."""
    if args.artifact:
        return args.artifact
    if not args.checkpoint.is_file():
        sys.exit(f"error: {args.checkpoint} not found. Fix: train it (models/train_reference.py) or pass --artifact")
    from deploykit import compress

    return compress(args.checkpoint, args.recipe, out=workdir / "ref.deploykit", data__name="fashion-mnist",
                    eval__enabled=False).path
