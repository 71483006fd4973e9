"""A stop request (SIGTERM / SIGINT) as a flag that long loops check between steps.

The signal handler only sets the flag; ``check_stop()`` raises ``Terminated`` at the next safe point (between
batches, timing blocks, optimisation steps and stages), so the unwinding never starts inside a native runtime's
call (a handler that raised there crashed PyTorch's OpenMP workers with SIGSEGV in 6 of 10 tries during
evaluation). ``ArtifactWriter`` also reads the flag: a stopped run never commits its directory.

Example:
    >>> for x in batches:
    ...     check_stop()
    ...     run(x)
"""

from __future__ import annotations

from .errors import Terminated

_stop_code: int | None = None


def request_stop(code: int) -> None:
    """From now on ``check_stop`` raises and no ArtifactWriter commits (code: the exit status, 128 + signal).

    A flag, not only an exception, because an exception raised by a signal handler inside a ``__del__`` or a GC
    callback is lost (Python prints "Exception ignored" and carries on: once a SIGTERM'd run exited 0)."""
    global _stop_code
    _stop_code = code


def stop_code() -> int | None:
    return _stop_code


def check_stop() -> None:
    """Raise ``Terminated`` if a stop was requested: call it between steps of any long loop."""
    if _stop_code is not None:
        raise Terminated(_stop_code)
