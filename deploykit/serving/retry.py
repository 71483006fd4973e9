"""Calling the model service from the HTTP front: bounded attempts, retried when the connection fails or stalls.

Used only when the model runs in its own service (DEPLOYKIT_MODEL_SERVICE=1). The largest cause of dropped calls,
BentoML recycling its client's connection pool under calls still in flight, is configured away in service.py
(runner_connection); retries cover what remains.

Why: BentoML's internal client reuses keep-alive connections that the model worker may already have closed.
Under concurrent load ~2-5% of calls fail at once with a disconnect (bentoml/BentoML#4971), and with adaptive
batching about 1 call in 3,000-6,000 never returns at all (measured with bench/serve_load.py, 8 clients, 2 front
workers: the model worker logged its answer, status 200, and the front never got it). Inference is
idempotent, so a fresh attempt on a new connection is safe; a per-attempt timeout turns a stall into a retry.

Example:
    >>> import asyncio
    >>> asyncio.run(call_with_retries(lambda: asyncio.sleep(0, result=42), timeout_s=1.0, retries=2))
    42
"""

from __future__ import annotations

import asyncio
import typing as t

T = t.TypeVar("T")


def is_dropped_connection(err: BaseException) -> bool:
    """A failure of the connection, not of the model: aiohttp's connection errors, or the RuntimeError
    ("Connection closed.") aiohttp raises when the drop hits while the body is being read."""
    try:
        import aiohttp

        if isinstance(err, aiohttp.ClientConnectionError):
            return True
    except ImportError:  # pragma: no cover - aiohttp comes with bentoml
        pass
    return isinstance(err, RuntimeError) and "Connection closed" in str(err)


async def call_with_retries(make_call: t.Callable[[], t.Awaitable[T]], *, timeout_s: float, retries: int,
                            log: t.Callable[[str], None] | None = None) -> T:
    """Await ``make_call()``; on a dropped connection or after ``timeout_s`` without an answer, try again,
    at most ``retries`` more times. The last failure is raised (asyncio.TimeoutError for a stall)."""
    for attempt in range(retries + 1):
        try:
            return await asyncio.wait_for(make_call(), timeout_s)
        except asyncio.TimeoutError:
            if attempt == retries:
                raise
            reason = f"no answer in {timeout_s:g} s"
        except Exception as err:  # noqa: BLE001 - only connection failures are retried, the rest re-raised
            if not is_dropped_connection(err) or attempt == retries:
                raise
            reason = f"{type(err).__name__}: {err}"
        if log:
            log(f"model call dropped ({reason}), retry {attempt + 1}/{retries}")
    raise AssertionError("unreachable")
