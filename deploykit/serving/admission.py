"""Admitting work under load: a bounded request queue and a budget of decoded pixels, both answering 503 +
Retry-After when full instead of letting memory or latency grow without bound.

Pure asyncio (no BentoML): everything runs on one event loop per worker process, so plain counters suffice.

Example:
    >>> budget = Budget(40_000_000, wait_s=5.0, what="decoded pixels")
    >>> img = await budget.run(img.width * img.height, decode_and_preprocess, img)   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import os
import typing as t

DEFAULT_MAX_ACTIVE = 32
DEFAULT_MAX_QUEUE = 512
DEFAULT_RETRY_AFTER_S = 1


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer environment variable; a value that is not one stops the server with a message that names it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number. Fix: set it to an integer such as {default}") from None
    if value < minimum:
        raise ValueError(f"{name}={value} is below {minimum}. Fix: set it to {minimum} or more (default {default})")
    return value


class Overloaded(Exception):
    """Work refused because a bound is reached: answered 503 with ``Retry-After``."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = DEFAULT_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class Budget:
    """A shared capacity (e.g. pixels being decoded) that concurrent work reserves before it starts.

    Work that does not fit waits, at most ``wait_s``, then is refused with ``Overloaded``. Work that fits goes
    ahead even when larger work is waiting (a small image never queues behind a huge one). A request larger than
    the whole capacity is charged the capacity, so it runs alone instead of never.
    """

    def __init__(self, capacity: int, *, wait_s: float, what: str):
        if capacity < 1:
            raise ValueError(f"a budget of {capacity} {what} admits nothing")
        self.capacity, self.wait_s, self.what = int(capacity), float(wait_s), what
        self.in_use = 0
        self.peak = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self, amount: int) -> int:
        """Reserve ``amount`` (capped at the capacity); returns what was reserved. Raises Overloaded after wait_s."""
        amount = min(max(int(amount), 0), self.capacity)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self.in_use + amount > self.capacity:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise Overloaded(f"the server is busy: {self.in_use} of {self.capacity} {self.what} are in use by "
                                 f"other requests and {amount} more did not fit within {self.wait_s:g} s") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.in_use += amount
        self.peak = max(self.peak, self.in_use)
        return amount

    def release(self, amount: int) -> None:
        self.in_use -= amount
        waiters, self._waiters = self._waiters, []
        for w in waiters:  # each re-checks whether it fits now
            if not w.done():
                w.set_result(None)

    async def run(self, amount: int, fn: t.Callable[..., t.Any], *args: t.Any) -> t.Any:
        """Reserve ``amount``, run ``fn(*args)`` in a worker thread, release when the thread is done.

        The reservation follows the thread, not the awaiting request: if the request is cancelled the
        decode still holds its memory until it finishes, so the budget never under-counts.
        """
        held = await self.acquire(amount)
        ctx = contextvars.copy_context()
        try:
            fut = asyncio.get_running_loop().run_in_executor(None, functools.partial(ctx.run, fn, *args))
        except BaseException:
            self.release(held)
            raise
        fut.add_done_callback(lambda _: self.release(held))
        return await asyncio.shield(fut)


class AdmissionControl:
    """ASGI middleware: at most ``max_active`` requests to ``paths`` are processed at once per worker, at most
    ``max_queue`` more wait for a turn (holding no body: it is read only once admitted), and any request beyond
    that is answered ``503`` with ``Retry-After`` at once. Other paths (health, metrics) are never queued.

    Args:
        app: the ASGI app it wraps.
        paths: {path: body byte cap}; a refused request's body is drained up to the cap so that its client
            reads the 503 instead of a reset connection.
        max_active, max_queue: the bounds (per worker process).
    """

    def __init__(self, app, *, paths: dict[str, int], max_active: int = DEFAULT_MAX_ACTIVE,
                 max_queue: int = DEFAULT_MAX_QUEUE, retry_after_s: int = DEFAULT_RETRY_AFTER_S,
                 on_refuse: t.Callable[[str], None] | None = None):
        self.app, self.paths = app, paths
        self.max_active, self.max_queue, self.retry_after_s = max_active, max_queue, retry_after_s
        self.on_refuse = on_refuse
        self.active = self.waiting = 0
        self._turns: asyncio.Semaphore | None = None  # created on the serving loop

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        if self._turns is None:
            self._turns = asyncio.Semaphore(self.max_active)
        if self._turns.locked() and self.waiting >= self.max_queue:
            return await self._refuse(scope, receive, send)
        self.waiting += 1
        try:
            await self._turns.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self._turns.release()

    async def _refuse(self, scope, receive, send):
        message = (f"the server is busy: {self.active} requests are being processed and {self.waiting} are queued "
                   f"(the limit). Fix: retry after {self.retry_after_s} s")
        if self.on_refuse:
            self.on_refuse(message)
        cap, size, more = self.paths[scope["path"]], 0, True
        while more and size <= cap:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break  # still answered below: BentoML's timeout middleware waits for an answer to every request
            size += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(self.retry_after_s).encode())]})
        await send({"type": "http.response.body", "body": body})
