"""The model run inside the HTTP front's process: no second service, no local HTTP hop, no client pool.

Calls that arrive while the model is busy are merged into its next run (up to ``max_rows`` rows), so concurrent
requests still share one ``backend.run`` the way BentoML's adaptive batching merges them, without waiting for a
batch to fill: a call on an idle model runs at once.

Example:
    >>> model = LocalModel(backend.run, max_rows=64)
    >>> logits = await model.infer(x)        # x: float32 NCHW rows   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextvars
import typing as t
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class LocalModel:
    """Runs ``run(x) -> logits`` on one dedicated thread, merging the calls that queue up while it runs."""

    def __init__(self, run: t.Callable[[np.ndarray], np.ndarray], max_rows: int = 64):
        self._run, self.max_rows = run, max(1, int(max_rows))
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None
        # one thread: the runtime's own intra-op threads use the cores; two runs at once would only contend
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="deploykit-model")
        self.runs = self.rows = 0

    async def infer(self, x: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((x, fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), context=contextvars.Context())
        return await fut

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            take, rows = [], 0
            while self._pending and (not take or rows + len(self._pending[0][0]) <= self.max_rows):
                x, fut = self._pending.pop(0)
                if not fut.done():  # a caller that gave up is not run
                    take.append((x, fut))
                    rows += len(x)
            if not take:
                continue
            batch = take[0][0] if len(take) == 1 else np.concatenate([x for x, _ in take])
            try:
                out = await loop.run_in_executor(self._thread, self._run, batch)
            except Exception as err:  # noqa: BLE001 - the callers get the runtime's error
                for _, fut in take:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self.runs, self.rows = self.runs + 1, self.rows + len(batch)
            start = 0
            for x, fut in take:
                if not fut.done():
                    fut.set_result(out[start:start + len(x)])
                start += len(x)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
