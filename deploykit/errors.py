"""User-facing errors: one line that names the problem and the fix.

Example:
    >>> raise DeployKitError("checkpoint 'x.pth' is truncated", fix="re-download or re-save it")
"""

from __future__ import annotations


class DeployKitError(Exception):
    """An error caused by the user's input, printed by the CLI as one line and exit code 2."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".") if fix else None
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.problem}. Fix: {self.fix}." if self.fix else f"{self.problem}."


class CheckpointError(DeployKitError):
    """The checkpoint file cannot be read, trusted, or matched to an architecture."""


class RecipeError(DeployKitError):
    """A recipe is malformed: unknown stage, unknown field, bad value."""


class DataError(DeployKitError):
    """The dataset is missing, empty, not images, or does not fit the model."""


class ParityError(DeployKitError):
    """An exported or quantized model disagrees with its source beyond the stated tolerance."""


class RuntimeUnavailable(DeployKitError):
    """This machine's runtime cannot execute what was asked (e.g. BF16 on a CPU whose kernels refuse it)."""


class UnsupportedModelError(DeployKitError):
    """A stage cannot handle this model's layers (e.g. pruning an attention type Torch-Pruning cannot resize)."""


class ArtifactError(DeployKitError):
    """An artifact directory is missing, incomplete, or would overwrite something."""


class Terminated(SystemExit):
    """The run was asked to stop (SIGTERM): unwinds through ArtifactWriter, which deletes the half-built directory.

    A SystemExit, not an Exception, so that ``except Exception`` in a stage cannot swallow it.
    """
