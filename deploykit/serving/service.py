"""The BentoML service: `bentoml serve deploykit.serving:Classifier` serves a deploykit artifact.

Two services, one command. ``Classifier`` (HTTP front) decodes uploads, applies the artifact's exact
preprocessing and builds the TTA views; ``ClassifierModel`` holds the runtime and exposes one
adaptive-batching API, so the views of one request and the requests of concurrent clients reach
``backend.run`` together. (A batchable BentoML API takes exactly one argument, so per-request ``tta``
and ``top_k`` could not live on a batchable front endpoint: see docs/serving.md.)

Configuration (environment, read at import in every worker):
    DEPLOYKIT_ARTIFACT   artifact directory to serve (wins over the model store)
    DEPLOYKIT_MODEL      BentoML store tag when DEPLOYKIT_ARTIFACT is unset (default deploykit-classifier:latest)
    DEPLOYKIT_BACKEND    runtime override (default: the one the artifact's manifest names)
    DEPLOYKIT_THREADS    intra-op threads per model worker (default: (physical cores - front workers) / model workers)
    DEPLOYKIT_TTA        views for tta=all, e.g. "original,hflip,scale:0.9,scale:1.1" (default) or "none"
    DEPLOYKIT_TTA_DEFAULT  TTA for requests that do not say: "policy" (default: the artifact's tta_policy.json;
                         every view when it has none), "selective", "all" (or "true"), "none" (or "false")
    DEPLOYKIT_BATCHING   "0" turns adaptive batching off (for the load-test comparison)
    DEPLOYKIT_MAX_BATCH_SIZE / DEPLOYKIT_MAX_LATENCY_MS   adaptive batching bounds (default 64 / 1000)
    DEPLOYKIT_INFER_TIMEOUT_S   a model call unanswered this long is retried (default 10)
    DEPLOYKIT_MODEL_SERVICE  "1": run the model in its own BentoML service (adaptive batching, one HTTP hop);
                         default "0": in the front's process (see docs/serving.md)
    DEPLOYKIT_MAX_ACTIVE / DEPLOYKIT_MAX_QUEUE   classify requests processed at once / waiting, per front worker;
                         beyond both: 503 + Retry-After (default 32 / 512)
    DEPLOYKIT_DECODE_BUDGET_PIXELS / DEPLOYKIT_DECODE_WAIT_S   pixels decoded at once per front worker (default: the
                         per-image limit) and how long an upload waits for room before a 503 (default 10)
    DEPLOYKIT_BODY_TIMEOUT_S  an admitted request's body must arrive within this long, else 408 (default 30)
    DEPLOYKIT_MMAP_THRESHOLD  glibc: allocations from this many bytes are returned to the OS when freed (default
                         4 MiB; 0 leaves glibc's own rule)
    DEPLOYKIT_WORKERS / DEPLOYKIT_MODEL_WORKERS   processes per service (default 1 / 1)
    DEPLOYKIT_MAX_PIXELS / DEPLOYKIT_MAX_BYTES / DEPLOYKIT_MAX_IMAGES   input limits

Example:
    $ DEPLOYKIT_ARTIFACT=ckpt.deploykit bentoml serve deploykit.serving:Classifier --port 3000
    $ curl -F image=@shoe.png -F top_k=3 http://127.0.0.1:3000/classify
"""

from __future__ import annotations

import os

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

import asyncio  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
import typing as t  # noqa: E402
from pathlib import Path  # noqa: E402

import bentoml  # noqa: E402
import numpy as np  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from ..artifact import Artifact  # noqa: E402
from ..tta_policy import merge_views  # noqa: E402
from . import admission, decode, observability, retry, store, tta  # noqa: E402
from .local_model import LocalModel  # noqa: E402

logger = logging.getLogger("bentoml.deploykit")
# in every process that imports the service: route-bounded metric labels, one-line logs for invalid input; in
# `bentoml serve`'s own process: a Prometheus directory of its own (observability.py says why)
observability.install_worker_hooks()
observability.isolate_prometheus_dir()
decode.return_large_buffers_to_os(admission.env_int("DEPLOYKIT_MMAP_THRESHOLD", decode.DEFAULT_MMAP_THRESHOLD))


def _env_bool(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None or v == "" else v.strip().lower() in ("1", "true", "yes", "on")


BATCHING = _env_bool("DEPLOYKIT_BATCHING", True)
MAX_BATCH_SIZE = int(os.environ.get("DEPLOYKIT_MAX_BATCH_SIZE", 64))
# Generous on purpose: BentoML's dispatcher answers 503 to a request queued longer than this, and a
# shared 2-core machine has multi-100-ms hiccups. Batches still form after ~ms, not after this bound.
MAX_LATENCY_MS = int(os.environ.get("DEPLOYKIT_MAX_LATENCY_MS", 1000))
WORKERS = int(os.environ.get("DEPLOYKIT_WORKERS", 1))
MODEL_WORKERS = int(os.environ.get("DEPLOYKIT_MODEL_WORKERS", 1))
MAX_IMAGES = int(os.environ.get("DEPLOYKIT_MAX_IMAGES", 32))
TTA_VIEWS = tta.parse_views(os.environ.get("DEPLOYKIT_TTA"))
TTA_MODES = ("policy", "selective", "all", "none")
_TTA_ALIASES = {"true": "all", "1": "all", "yes": "all", "on": "all", "false": "none", "0": "none", "no": "none",
                "off": "none"}


def tta_mode(value: t.Union[bool, str, None]) -> t.Optional[str]:
    """A request's or the environment's tta value -> one of TTA_MODES (None stays None); ValueError if unknown.
    (A form's "true"/"false" arrives as a bool: BentoML reads form values as JSON first.)"""
    if isinstance(value, bool):
        return "all" if value else "none"
    if value is None or str(value).strip() == "":
        return None
    v = str(value).strip().lower()
    v = _TTA_ALIASES.get(v, v)
    if v not in TTA_MODES:
        raise ValueError(f"tta={value!r} is not one of {', '.join(TTA_MODES)} (or true/false)")
    return v


TTA_DEFAULT = tta_mode(os.environ.get("DEPLOYKIT_TTA_DEFAULT")) or "policy"
INFER_RETRIES = 2
# A model call that has not answered in this long is abandoned and retried: normal calls take milliseconds
# (batches form within max_latency_ms), a stalled keep-alive connection never answers (serving/retry.py).
INFER_TIMEOUT_S = float(os.environ.get("DEPLOYKIT_INFER_TIMEOUT_S", 10))
# Where the model runs. In the front's process by default: measured faster on one machine than a second service
# (no local HTTP hop, no pickling, no client pool; docs/decisions.md). "1" keeps BentoML's two-service layout.
MODEL_SERVICE = _env_bool("DEPLOYKIT_MODEL_SERVICE", False)
MAX_ACTIVE = admission.env_int("DEPLOYKIT_MAX_ACTIVE", admission.DEFAULT_MAX_ACTIVE, 1)
MAX_QUEUE = admission.env_int("DEPLOYKIT_MAX_QUEUE", admission.DEFAULT_MAX_QUEUE, 0)
# Decoded pixels in flight per front worker. Default: one image at the per-image limit (40 MP: 40-160 MB decoded,
# up to ~19 bytes/pixel transiently for 16-bit images), while small images pass alongside it.
DECODE_BUDGET_PIXELS = max(admission.env_int("DEPLOYKIT_DECODE_BUDGET_PIXELS", decode.max_pixels(), 1), 1)
DECODE_WAIT_S = float(os.environ.get("DEPLOYKIT_DECODE_WAIT_S", 10))
# A request's whole body must arrive within this long once it is admitted (a slow sender holds a turn meanwhile).
BODY_TIMEOUT_S = float(os.environ.get("DEPLOYKIT_BODY_TIMEOUT_S", 30))


def model_threads() -> int:
    """Intra-op threads per model worker: DEPLOYKIT_THREADS, else the physical cores left after one per
    front worker (decode + preprocessing), shared by the model workers: 1 on a 2-core machine."""
    if os.environ.get("DEPLOYKIT_THREADS"):
        return max(1, int(os.environ["DEPLOYKIT_THREADS"]))
    from ..backends.base import physical_cores

    return max(1, (physical_cores() - WORKERS) // (MODEL_WORKERS if MODEL_SERVICE else WORKERS))


# Declared only when serving from the store, so `bentoml build` packages the model and the container
# needs no loose path; with DEPLOYKIT_ARTIFACT set nothing is declared (nothing to resolve at startup).
_STORE_MODEL = None if store.artifact_env() else bentoml.models.BentoModel(store.model_tag())


def _artifact_dir(svc: t.Any) -> Path:
    path = store.artifact_env()
    return Path(path) if path else store.stored_artifact_dir(svc.stored_model)


def _open_checked(svc: t.Any) -> Artifact:
    """The artifact, refused when a file serving reads no longer matches its manifest (edited labels or weights).
    With DEPLOYKIT_ARTIFACT the import-time check below already ran in this process; a store model is checked here."""
    art = Artifact.open(_artifact_dir(svc))
    return art if store.artifact_env() else art.check_served(os.environ.get("DEPLOYKIT_BACKEND"))


# Checked once at import too, in `bentoml serve`'s own process: a damaged artifact then stops the server with one
# error, instead of workers that fail their start and are restarted forever while /readyz never answers.
if store.artifact_env():
    Artifact.open(store.artifact_env()).check_served(os.environ.get("DEPLOYKIT_BACKEND"))


class ClientError(Exception):
    """A request we refuse: answered as {"error": message} with a 4xx status, logged as one line."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers

    def response(self):
        from starlette.responses import JSONResponse

        logger.warning("refused status=%d error=%s", self.status, self)
        return JSONResponse({"error": str(self)}, status_code=self.status, headers=self.headers)


class Prediction(BaseModel):
    label: str
    index: int
    probability: float


class Classification(BaseModel):
    predictions: list[Prediction] = Field(description="top-k classes, most probable first")
    tta_views: int = Field(description="views averaged for this image (1 = no test-time augmentation)")
    tta: str = Field("none", description="the TTA mode this image was scored with: none, selective or all")


def _metrics():
    """Prometheus counters for TTA (prometheus_client, which BentoML's /metrics collects across workers)."""
    from prometheus_client import Counter, Histogram

    return {"images": Counter("deploykit_tta_images", "images classified, by TTA mode", ["mode"]),
            "escalated": Counter("deploykit_tta_escalated_images", "images a selective policy gave extra views"),
            "views": Counter("deploykit_tta_model_views", "model views run (images x views)", ["mode"]),
            "seconds": Histogram("deploykit_classify_seconds", "time to classify one request, by TTA mode", ["mode"],
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))}


FIELDS = {"/classify": ("image", "top_k", "tta"), "/classify_batch": ("images", "top_k", "tta")}


async def form_problem(path: str, content_type: str, body: bytes) -> tuple[int, str] | None:
    """What is wrong with a classify request's form, as (status, message), or None if its shape is right.

    The form is read with the parser BentoML itself uses (Starlette's, on python-multipart), so both see the same
    fields: a text value in the file field (which BentoML would fetch as a URL), a part without a usable name, two
    files where one is expected, or an unknown field are refused here with a 400 instead of reaching BentoML.
    """
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    ctype = content_type.split(";")[0].strip().lower()
    field = FIELDS[path][0]
    fix = f"Fix: send the image as -F {field}=@photo.jpg"
    if ctype != "multipart/form-data":
        return 415, (f"content type {ctype or '(none)'!r} is not accepted. Fix: send multipart/form-data with the "
                     f"image in field '{field}', e.g. curl -F {field}=@photo.jpg")
    if "boundary=" not in content_type:
        return 400, "multipart/form-data without a boundary. Fix: let your HTTP client build the form (curl -F)"

    async def stream():
        yield body

    try:
        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
    except MultiPartException as err:
        return 400, f"malformed multipart form: {err}. {fix}"
    try:
        items = form.multi_items()
        names = [k for k, _ in items]
        unknown = sorted(set(names) - set(FIELDS[path]))
        if unknown:
            return 400, (f"unknown form field(s) {', '.join(map(repr, unknown))}; {path} takes "
                         f"{', '.join(FIELDS[path])}. {fix}")
        files = [v for k, v in items if k == field]
        if not files:
            return 400, f"form field '{field}' is missing. {fix}"
        if not all(isinstance(v, UploadFile) for v in files):
            return 400, f"form field '{field}' must be a file upload, not a text value. {fix}"
        if path == "/classify" and len(files) > 1:
            return 400, (f"form field 'image' holds {len(files)} files; /classify takes one. Fix: send one, or "
                         "several to /classify_batch as -F images=@a.jpg -F images=@b.jpg")
        for k, v in items:
            if k != field and (isinstance(v, UploadFile) or names.count(k) > 1):
                return 400, f"form field '{k}' must be one text value. Fix: e.g. -F {k}=3"
    finally:
        await form.close()
    return None


class CheckForm:
    """ASGI middleware for the classify endpoints: 415 unless multipart/form-data, 413 over the byte limit,
    400 for a missing or unknown field; the buffered body is then replayed to BentoML unchanged."""

    def __init__(self, app, **_):
        self.app = app
        self.limits = self.body_limits()

    @staticmethod
    def body_limits() -> dict[str, int]:
        """Per endpoint, checked while the body streams in: one image's bytes for /classify, MAX_IMAGES' for the
        batch (plus 1 MiB of form overhead); a larger body is refused before it is read whole."""
        return {"/classify": decode.max_bytes() + 1024 * 1024,
                "/classify_batch": decode.max_bytes() * MAX_IMAGES + 1024 * 1024}

    async def __call__(self, scope, receive, send):
        if not (scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path") in FIELDS):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_TIMEOUT_S
        limit = self.limits[scope["path"]]
        # a body that says it is too large is read up to the limit and dropped, not kept: the client then reads our
        # 413 (a connection closed on unread bytes would reset it), and memory holds no part of it
        keep = not headers.get("content-length", "").isdigit() or int(headers["content-length"]) <= limit
        chunks, size, more, body = [], 0, True, b""
        while more:
            try:  # a client that never finishes its body would hold its admission slot forever
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                problem = (408, f"the request body was not complete after {BODY_TIMEOUT_S:g} s ({size} bytes "
                                "received). Fix: send the whole request at once (or raise DEPLOYKIT_BODY_TIMEOUT_S)")
                break
            if message["type"] == "http.disconnect":
                # answered all the same (the server drops it): BentoML's timeout middleware holds every request
                # that sends nothing for its full traffic timeout, and a server shutdown waits for it
                problem = (499, f"the client disconnected after {size} bytes of the body")
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if keep:
                chunks.append(chunk)
            more = message.get("more_body", False)
            if size > limit:
                problem = (413, f"request body is over the {limit}-byte limit of {scope['path']}. Fix: send "
                                "smaller or fewer images")
                break
        else:
            body, chunks = b"".join(chunks), None  # one copy of the body, not two
            problem = await form_problem(scope["path"], headers.get("content-type", ""), body)
        if problem:
            await ClientError(problem[1], problem[0]).response()(scope, receive, send)
            return
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# runner_connection: BentoML's client to this service otherwise closes its connection pool every 100 calls (or 300 s)
# while other calls are still using it; under concurrent load those calls fail ("Connector is closed", "Server
# disconnected": 356 of 800 requests at 100 clients). The pool is local and long-lived, so it is never recycled.
@bentoml.service(name="deploykit-model", workers=MODEL_WORKERS, threads=1, traffic={"timeout": 60},
                 runner_connection={"max_requests": 2**62, "max_age": 1e12})
class ClassifierModel:
    """The artifact's model on its runtime, behind one adaptive-batching API (logits for NCHW inputs)."""

    stored_model = _STORE_MODEL

    def __init__(self) -> None:
        self.artifact, self.backend = _load_model(self)

    @bentoml.api(batchable=BATCHING, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, x: np.ndarray) -> np.ndarray:
        """float32 NCHW (already preprocessed, TTA views included) -> float32 logits."""
        return self.backend.run(x)

    @bentoml.api
    def info(self) -> dict:
        return _model_info(self.artifact, self.backend, "service")


def _load_model(svc: t.Any):
    """(artifact, backend) for a service that runs the model, warmed up so that /readyz means ready."""
    artifact = _open_checked(svc)
    backend = artifact.backend(threads=model_threads())
    backend.run(np.zeros((1, *artifact.preprocessing.input_size), np.float32))  # first-call allocations
    logger.info("deploykit model ready: artifact=%s backend=%s", artifact.path, backend.info())
    return artifact, backend


def _model_info(artifact: Artifact, backend: t.Any, placement: str) -> dict:
    # the directory's name, not its path: /metadata is unauthenticated and must not map the server's disk
    return {"artifact": artifact.path.name, "backend": backend.info(), "runtime": artifact.runtime,
            "placement": placement, "batching": BATCHING, "max_batch_size": MAX_BATCH_SIZE,
            "max_latency_ms": MAX_LATENCY_MS if placement == "service" else None}


@bentoml.service(name="deploykit-classifier", workers=WORKERS, traffic={"timeout": 60},
                 metrics={"enabled": True})
class Classifier:
    """Image in, top-k labels with probabilities out; TTA views scored in one batched model call."""

    stored_model = _STORE_MODEL
    if MODEL_SERVICE:  # declared only then: BentoML starts a dependency's service whether it is called or not
        model = bentoml.depends(ClassifierModel)

    def __init__(self) -> None:
        if MODEL_SERVICE:
            self.artifact = _open_checked(self)
            self.local = None
        else:
            self.artifact, self.backend = _load_model(self)
            # without batching each call runs alone (max_rows=1 never merges two calls)
            self.local = LocalModel(self.backend.run, max_rows=MAX_BATCH_SIZE if BATCHING else 1)
        self.pre = self.artifact.preprocessing
        self.class_names = list(self.pre.class_names)  # empty: labels are the class indices
        self.policy = self.artifact.tta_policy
        self.metrics = _metrics()
        self.pixels = admission.Budget(DECODE_BUDGET_PIXELS, wait_s=DECODE_WAIT_S, what="decoded pixels")
        logger.info("deploykit classifier ready: views=%s tta_default=%s policy=%s", TTA_VIEWS, TTA_DEFAULT,
                    self.policy.mode if self.policy else None)

    @staticmethod
    def _check_top_k(top_k: int, n: int) -> None:
        if not 1 <= top_k <= n:
            raise ClientError(f"top_k must be between 1 and {n} (the model has {n} classes), got {top_k}. "
                              f"Fix: send top_k in 1..{n}")

    def _mode(self, requested: t.Union[bool, str, None]) -> str:
        """none | selective | all for this request: its own tta, else DEPLOYKIT_TTA_DEFAULT, else the policy."""
        try:
            mode = tta_mode(requested) or TTA_DEFAULT
        except ValueError as err:
            raise ClientError(f"{err}. Fix: send tta=policy, selective, all or none") from None
        if mode == "policy":
            mode = self.policy.mode if self.policy is not None else "all"
        if mode == "selective" and (self.policy is None or self.policy.gate is None):
            why = self.policy.reason if self.policy is not None else "the artifact has no TTA policy"
            raise ClientError(f"tta=selective needs the artifact's selective policy, and it has none ({why}). "
                              "Fix: send tta=all or tta=none, or compress with the tta_policy stage and --data")
        return mode

    async def _inputs(self, paths: list[Path], views: tuple[str, ...], field: str) -> np.ndarray:
        """Decode + preprocess + TTA views for every upload, in worker threads. Each image first reserves its
        pixel count from the decode budget (read from its header), so concurrent large uploads wait (or get a 503)
        instead of being decoded all at once."""
        rows = []
        for i, p in enumerate(paths):
            name = field if len(paths) == 1 else f"{field}[{i}]"
            img = await asyncio.to_thread(self._open, p, name)
            try:
                rows.append(await self.pixels.run(img.width * img.height, self._preprocess, img, views, name))
            except admission.Overloaded as err:
                raise ClientError(f"{err}. Fix: retry after {err.retry_after_s} s, or send smaller images", 503,
                                  err.headers) from None
        return np.concatenate(rows)

    @staticmethod
    def _open(path: Path, name: str):
        try:
            return decode.open_image(Path(path).read_bytes(), name=name)
        except decode.InputError as err:
            raise ClientError(str(err), err.status) from None

    def _preprocess(self, img, views: tuple[str, ...], name: str) -> np.ndarray:
        try:
            x = self.pre.from_pil(decode.load_image(img, name=name))
        except decode.InputError as err:
            raise ClientError(str(err), err.status) from None
        except ValueError as err:  # e.g. a channel count the model cannot take
            raise ClientError(f"{name}: {err}. Fix: send an RGB or grayscale image") from None
        return tta.make_views(x, views)

    async def _classify(self, paths: list[Path], top_k: int, requested: t.Union[bool, str, None], field: str
                        ) -> list[Classification]:
        t0 = time.perf_counter()
        self._check_top_k(top_k, len(self.class_names) or max(top_k, 1))
        mode = self._mode(requested)
        if mode == "all":  # every view of every image: one call
            views = TTA_VIEWS
            x = await self._inputs(paths, views, field)
            logits = tta.average_logits(np.asarray(await self._infer(x)), len(views))
            used = np.full(len(paths), len(views))
        else:  # the originals in one call; with a selective policy, the uncertain images' extra views in a second
            x = await self._inputs(paths, ("original",), field)
            logits = np.asarray(await self._infer(x))
            used = np.ones(len(paths), dtype=np.int64)
            if mode == "selective":
                esc = np.flatnonzero(self.policy.escalate(logits))
                more = await self._infer(tta.make_views(x[esc], self.policy.views[1:])) if len(esc) else None
                logits, used = merge_views(logits, esc, more, len(self.policy.views) - 1)
                self.metrics["escalated"].inc(len(esc))
        probs = tta.softmax(logits)
        out = [Classification(predictions=tta.top_k(p, top_k, self.class_names), tta_views=int(v), tta=mode)
               for p, v in zip(probs, used)]
        seconds = time.perf_counter() - t0
        self.metrics["images"].labels(mode).inc(len(paths))
        self.metrics["views"].labels(mode).inc(int(used.sum()))
        self.metrics["seconds"].labels(mode).observe(seconds)
        logger.info("classified images=%d tta=%s views=%d top1=%s ms=%.1f", len(paths), mode, int(used.sum()),
                    [o.predictions[0].label for o in out], seconds * 1e3)
        return out

    async def _infer(self, x: np.ndarray) -> np.ndarray:
        """Run the model: in this process, or through the model service, where a dropped or stalled call is retried
        (see serving/retry.py)."""
        if self.local is not None:
            return await self.local.infer(x)
        return await retry.call_with_retries(lambda: self.model.to_async.infer(x), timeout_s=INFER_TIMEOUT_S,
                                             retries=INFER_RETRIES, log=logger.warning)

    @bentoml.api(route="/classify")
    async def classify(self, image: Path, top_k: int = 5, tta: t.Union[bool, str, None] = None) -> Classification:
        """Classify one image (multipart field `image`); `tta` (policy | selective | all | none) overrides the
        service default."""
        try:
            return (await self._classify([image], top_k, tta, "image"))[0]
        except ClientError as err:
            return err.response()

    @bentoml.api(route="/classify_batch")
    async def classify_batch(self, images: list[Path], top_k: int = 5, tta: t.Union[bool, str, None] = None
                             ) -> list[Classification]:
        """Classify up to DEPLOYKIT_MAX_IMAGES images (repeated multipart field `images`) in one model call."""
        try:
            if len(images) > MAX_IMAGES:
                raise ClientError(f"{len(images)} images is over the limit of {MAX_IMAGES} per request. Fix: "
                                  f"split the request (or raise DEPLOYKIT_MAX_IMAGES)", 413)
            return await self._classify(images, top_k, tta, "images")
        except ClientError as err:
            return err.response()

    @bentoml.api(route="/metadata")
    async def metadata(self) -> dict:
        """Class names, preprocessing, TTA views and the model worker's runtime."""
        return {"class_names": self.class_names, "preprocessing": self.pre.model_dump(mode="json"),
                "tta_views": list(TTA_VIEWS), "tta_default": TTA_DEFAULT, "max_images": MAX_IMAGES,
                "tta_policy": self.policy.summary() if self.policy is not None else None,
                "max_pixels": decode.max_pixels(),
                "model": (_model_info(self.artifact, self.backend, "in-process") if self.local is not None
                          else await self.model.to_async.info())}


# Outermost first: a request waits for its turn (AdmissionControl) before its body is read and checked (CheckForm).
Classifier.add_asgi_middleware(admission.AdmissionControl, paths=CheckForm.body_limits(), max_active=MAX_ACTIVE,
                               max_queue=MAX_QUEUE,
                               on_refuse=lambda m: logger.warning("refused status=503 error=%s", m))
Classifier.add_asgi_middleware(CheckForm)
