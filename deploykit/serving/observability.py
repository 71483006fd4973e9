"""Metrics and logs a client cannot blow up: bounded path labels, a Prometheus directory per server, and one-line
logs for requests refused by validation.

BentoML 1.4 labels its request metrics with the raw URL path, so every random 404 path becomes a new time series
(one file entry per label set in the multiprocess directory, and more text on every /metrics scrape); it keeps that
directory at $BENTOML_HOME/prometheus_multiproc_dir and empties it when a server starts, so a second server on the
machine wipes the first one's counters; and it logs a pydantic validation failure (a client's 400) as an ERROR with
a full traceback. Each function here fixes one of these; ``install_worker_hooks`` / ``isolate_prometheus_dir`` are
called by service.py.

Example:
    >>> path_label({"type": "http", "path": "/wp-login.php", "method": "GET"}, router)
    'unknown'
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import typing as t
from pathlib import Path

UNKNOWN_PATH_LABEL = "unknown"
_PROM_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
logger = logging.getLogger("bentoml.deploykit")


def path_label(scope: dict, router: t.Any) -> str:
    """The metrics label of a request: its route's path template ("/classify", "/static_content" for anything under
    that mount), or UNKNOWN_PATH_LABEL when no route matches. Wrong-method requests keep their route's label."""
    for route in getattr(router, "routes", ()):
        try:
            match, _ = route.matches(scope)
        except Exception:  # noqa: BLE001 - a route that cannot judge this scope does not match it
            continue
        if match.name != "NONE":
            return getattr(route, "path", None) or UNKNOWN_PATH_LABEL
    return UNKNOWN_PATH_LABEL


def _find_router(app: t.Any) -> t.Any:
    """The Starlette router at the bottom of a middleware chain (each middleware keeps the next one in ``.app``)."""
    seen = 0
    while app is not None and not hasattr(app, "routes") and seen < 64:
        app, seen = getattr(app, "app", None), seen + 1
    return app if hasattr(app, "routes") else None


class _RestorePath:
    """Hands the inner app the request's real path again (the label-only path stops at the metrics middleware)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if "deploykit.path" in scope:
            scope = {**scope, "path": scope["deploykit.path"]}
            del scope["deploykit.path"]
        await self.app(scope, receive, send)


def bound_metric_labels() -> bool:
    """Make BentoML's request-metrics middleware label by route, with one label for all unknown paths.

    BentoML builds its middleware list when the app is created (after the service module is imported) and reads
    the class from ``bentoml._internal.server.http.instruments``; a subclass put there sees a copy of the scope whose
    path is the label, while the app below it still gets the real path (access log, routing, 404 body unchanged).
    Returns False, and changes nothing, if this BentoML has no such class (tests then fail loudly on the labels).
    """
    try:
        from bentoml._internal.server.http import instruments
    except ImportError:  # pragma: no cover - only with a BentoML that moved its metrics middleware
        return False
    base = getattr(instruments, "RunnerTrafficMetricsMiddleware", None)
    if base is None or getattr(base, "_deploykit_bounded", False):
        return base is not None

    class BoundedPathMetrics(base):  # type: ignore[misc, valid-type]
        _deploykit_bounded = True

        def __init__(self, app, *args, **kwargs):
            super().__init__(_RestorePath(app), *args, **kwargs)
            self._router = None

        async def __call__(self, scope, receive, send):
            if scope.get("type") == "http" and scope.get("path") != "/metrics":
                if self._router is None:
                    self._router = _find_router(self.app) or False
                label = path_label(scope, self._router) if self._router else scope["path"]
                if label != scope["path"]:
                    scope = {**scope, "path": label, "deploykit.path": scope["path"]}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = BoundedPathMetrics
    return True


class OneLineClientErrors(logging.Filter):
    """Turns BentoML's ERROR + traceback for a client's invalid input (pydantic ValidationError, or a BentoML error
    with a 4xx code) into one WARNING line with the validation messages; real server errors pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        status = _client_error_status(exc)
        if status is None:
            return True
        record.msg, record.args = "refused status=%d %s error=%s", (status, record.getMessage(), _one_line(exc))
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def _client_error_status(exc: BaseException) -> int | None:
    try:
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            return 400
    except ImportError:  # pragma: no cover
        pass
    code = getattr(getattr(exc, "error_code", None), "value", None)
    return code if isinstance(code, int) and 400 <= code < 500 else None


def _one_line(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            return "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}"
                             for e in errors(include_url=False, include_input=False))
        except Exception:  # noqa: BLE001 - fall back to the plain message
            pass
    return " ".join(str(exc).split())[:500]


def install_worker_hooks() -> None:
    """In every process that imports the service: bounded labels, one-line client errors."""
    if not bound_metric_labels():
        logger.warning("could not bound the request-metrics path labels (unexpected BentoML version)")
    for name in ("bentoml._internal.server.http_app", "bentoml.serve"):
        log = logging.getLogger(name)
        if not any(isinstance(f, OneLineClientErrors) for f in log.filters):
            log.addFilter(OneLineClientErrors())


def isolate_prometheus_dir(bentoml_home: str | os.PathLike | None = None) -> Path | None:
    """Give this server its own Prometheus multiprocess directory, $BENTOML_HOME/deploykit_prometheus/<pid>.

    Runs in ``bentoml serve``'s own process (it imports the service before it starts the workers); the workers then
    inherit the directory through PROMETHEUS_MULTIPROC_DIR, which is how this function tells it is in a worker
    (and does nothing there). Directories of servers that are gone are removed; this one is removed at exit.
    Returns the directory, or None where nothing was changed.
    """
    if os.environ.get(_PROM_DIR_ENV):
        return None
    from bentoml._internal.configuration.containers import BentoMLContainer

    from ..artifact import pid_alive

    home = Path(bentoml_home or BentoMLContainer.bentoml_home.get())
    base = home / "deploykit_prometheus"
    mine = base / str(os.getpid())
    if base.is_dir():
        for d in base.iterdir():
            if d.name.isdigit() and d != mine and not pid_alive(int(d.name)):
                shutil.rmtree(d, ignore_errors=True)
    BentoMLContainer.prometheus_multiproc_dir.set(str(mine))  # bentoml.serving.ensure_prometheus_dir creates it
    atexit.register(shutil.rmtree, mine, True)
    return mine
