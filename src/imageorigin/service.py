"""The moderation service: a FastAPI application over :func:`imageorigin.predict`.

``imageorigin serve`` runs :func:`create_app` under uvicorn, one process, bound
to 127.0.0.1 unless told otherwise.  The model is loaded once and warmed up at
start-up; ``/readyz`` answers 503 until then.  Requests that arrive together
share forward passes: :class:`Batcher` gathers the images of concurrent
requests for up to ``max_wait_ms`` (or ``max_batch`` images) and runs them in
one ``predict`` call on a single inference thread, off the event loop (on 2
cores torch calls must not run 40 at once, anyio's default).  Past
``max_queue`` waiting images the server answers 503 with ``Retry-After``.

Hostile input gets a 4xx JSON error, never a 5xx: a body over the byte limit
(checked from Content-Length and again while it streams in, since Starlette
does not cap file parts), too many files, no files; a file that is not an
image, truncated or over the pixel limit gets its own ``error`` in the
results while the other files go on (422 when no file at all could be read).
There is no URL fetching: users upload the file.  No image bytes are logged or
kept.

Access (:class:`Guard`, the outermost layer): with API keys set, every
endpoint but ``/healthz`` needs one (``Authorization: Bearer KEY``,
``X-API-Key: KEY``, or HTTP Basic with the key as password, which a browser
asks for once and then sends with the page's own requests), compared in
constant time.  Each client (by address) has a token bucket: past it, 429 with
``Retry-After``.  A body must arrive within ``body_timeout_s`` (408 after it),
so a client trickling bytes holds a coroutine, never a thread, and not for
long.  Every answer carries ``nosniff`` and a Content-Security-Policy that
lets the page load only its own files (no inline script); no CORS headers are
sent, so other sites' pages cannot read the API's answers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import signal
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from . import __version__, provenance
from .images import ImageDecodeError, decode_image, max_pixels
from .hotswap import Busy, Models, Served, load_served, weak_spots  # noqa: F401 - weak_spots: its import path of before
from .predict import Prediction, current_engine, precision_reason, predict
from .feedback import FeedbackStore
from .access import CSP, Guard, _send_json, check_bind, load_api_keys  # noqa: F401 - the import paths of before
from .schemas import Analysis, ModelInfo, Status, errors
from .service_review import remember, review_routes


# The built-in limits (``serve --help`` prints them); IMAGEORIGIN_<NAME> and the flags override.
LIMIT_DEFAULTS = {"max_request_bytes": 64 << 20, "max_files": 32, "max_batch": 32, "max_wait_ms": 10.0,
                  "max_queue": 256, "rate_per_minute": 600, "rate_burst": 60, "body_timeout_s": 30.0,
                  "request_timeout_s": 120.0}


def _env(name: str) -> float:
    default = LIMIT_DEFAULTS[name]
    return type(default)(os.environ.get(f"IMAGEORIGIN_{name.upper()}", default))


@dataclass
class Limits:
    """Every limit of the service; each is a flag of ``imageorigin serve`` and an
    environment variable ``IMAGEORIGIN_<NAME>`` (e.g. IMAGEORIGIN_MAX_FILES)."""

    max_request_bytes: int = field(default_factory=lambda: _env("max_request_bytes"))
    max_files: int = field(default_factory=lambda: _env("max_files"))
    max_batch: int = field(default_factory=lambda: _env("max_batch"))
    max_wait_ms: float = field(default_factory=lambda: _env("max_wait_ms"))
    max_queue: int = field(default_factory=lambda: _env("max_queue"))
    max_pixels: int = field(default_factory=max_pixels)
    # Per client address: a bucket of rate_burst requests refilled at
    # rate_per_minute (0: no limit).
    rate_per_minute: int = field(default_factory=lambda: _env("rate_per_minute"))
    rate_burst: int = field(default_factory=lambda: _env("rate_burst"))
    body_timeout_s: float = field(default_factory=lambda: _env("body_timeout_s"))
    request_timeout_s: float = field(default_factory=lambda: _env("request_timeout_s"))


class Batcher:
    """Gathers the images of concurrent requests into shared ``predict`` calls.

    One background task takes images off a queue, waits up to ``max_wait_ms``
    for more (at most ``max_batch``), and runs the batch on one inference
    thread on ``models.current``, read once per batch (so a swap never splits
    one); each caller awaits its own images' (prediction, served model) pairs.
    """

    def __init__(self, models: Models, limits: Limits):
        self.models, self.limits = models, limits
        self.queue: asyncio.Queue = asyncio.Queue()
        self.waiting = 0  # images queued or in the batch being run
        self.stats = {"images": 0, "batches": 0}  # shared forward passes so far
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imageorigin-infer")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, images: list[Image.Image]) -> list[tuple[Prediction, Served]]:
        """(prediction, the model that made it) for each of ``images``, in order;
        raises Busy when the queue is full."""
        if self.waiting + len(images) > self.limits.max_queue:
            raise Busy()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        self.waiting += len(images)
        for image, future in zip(images, futures):
            self.queue.put_nowait((image, future))
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while len(batch) < self.limits.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except (asyncio.TimeoutError, ValueError):
                    break
            try:
                preds = await loop.run_in_executor(self.executor, self._predict, [im for im, _ in batch])
                self.stats["images"] += len(batch)
                self.stats["batches"] += 1
                for (_, future), p in zip(batch, preds):
                    if not future.done():
                        future.set_result(p)
            except Exception as err:  # noqa: BLE001 - a failed batch fails its callers, not the server
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
            finally:
                self.waiting -= len(batch)

    def _predict(self, images: list[Image.Image]) -> list[tuple[Prediction, Served]]:
        served = self.models.current  # once: the whole batch runs on one model
        return [(p, served) for p in predict(served.model, images, batch_size=self.limits.max_batch)]


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, whether it
    says so in Content-Length or only while streaming in; one that has not
    arrived ``timeout`` seconds after the request began gets 408."""

    def __init__(self, app, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, f"request body of {int(length)} bytes is over the "
                                               f"limit of {self.limit} bytes")
        seen, deadline = 0, time.monotonic() + self.timeout

        async def counted():
            nonlocal seen
            try:  # a client trickling its body in is cut off at the deadline
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s") from None
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(model: str = "default", limits: Limits | None = None, api_keys: list[str] | None = None,
               store: str | os.PathLike | None = None, keep_images: bool = False) -> FastAPI:
    """The service's application: load ``model`` at start-up (``"default"`` or a path).
    With ``api_keys``, every endpoint but /healthz needs one of them.  ``store``: a
    folder for reviewers' feedback and the deployment history (SQLite); with
    ``keep_images`` it also keeps the bytes of the images reviewers label."""
    limits = limits or Limits()
    state: dict = {"ready": False, "answers": OrderedDict(), "store": None}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["store"] = FeedbackStore(store, keep_images) if store is not None else None
        # Loaded and warmed up (the first forward pass compiles the engine) off the event loop.
        models = Models(await asyncio.to_thread(load_served, model), state["store"])
        state.update(models=models, batcher=Batcher(models, limits))
        state["batcher"].start()
        hangup = _on_hangup(lambda: models.deploy(model, by="SIGHUP"))
        state["ready"] = True
        yield
        state["ready"] = False
        hangup()
        await state["batcher"].stop()
        if state["store"] is not None:
            state["store"].close()

    app = FastAPI(title="imageorigin", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Tell whether an image was made by a person, by DALL-E, or by another AI "
                              "generator: evidence for a person to weigh, not proof.")
    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes, timeout=limits.body_timeout_s)
    docs_page = get_swagger_ui_html(openapi_url="/openapi.json", title="imageorigin API",
                                    swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                    swagger_css_url="/docs-assets/swagger-ui.css",
                                    swagger_favicon_url="/docs-assets/favicon-32x32.png")
    # Swagger UI starts from one inline script and sets inline styles: allow
    # exactly that script, by its hash, on /docs only.
    hashes = " ".join("'sha256-" + base64.b64encode(hashlib.sha256(m.encode()).digest()).decode() + "'"
                      for m in re.findall(r"<script>(.*?)</script>", docs_page.body.decode(), flags=re.S))
    docs_csp = CSP.replace("script-src 'self'", f"script-src 'self' {hashes}").replace(
        "style-src 'self'", "style-src 'self' 'unsafe-inline'")
    # Added last, so outermost: a refused request costs no body parsing.
    app.add_middleware(Guard, keys=list(api_keys or []), limits=limits, csp={"/docs": docs_csp})
    static = Path(str(resources.files("imageorigin") / "static"))
    app.mount("/static", StaticFiles(directory=static), name="static")
    try:  # FastAPI's /docs loads Swagger UI from a CDN: serve its files from a package instead
        import swagger_ui_bundle

        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
    except ImportError:  # pragma: no cover - a dependency of the service extra
        pass

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": "invalid request: " + "; ".join(
            f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())},
            status_code=422)

    @app.get("/", include_in_schema=False)
    async def page():
        from fastapi.responses import FileResponse

        return FileResponse(static / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return docs_page

    @app.get("/healthz", response_model=None, responses={200: {"model": Status}})
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=None, responses={200: {"model": Status}, **errors(401, 503)})
    async def readyz():
        """Readiness: 503 until the model is loaded and warm."""
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "2"})
        return {"status": "ready"}

    @app.get("/v1/model", response_model=None, responses={200: {"model": ModelInfo}, **errors(401, 429, 503)})
    async def model_info():
        """The model: labels, verdict cut-points, preprocessing, checkpoint hash, metrics,
        known weak spots, and the server's limits."""
        if not state["ready"]:
            raise HTTPException(503, "the model is loading", headers={"Retry-After": "2"})
        served = state["models"].current
        clf = served.model
        meta = clf.describe()
        run = current_engine(clf)
        return {
            "id": served.id, "sha256": served.id, "path": served.path, "since": served.since,
            "previous": [s.id for s in reversed(state["models"].previous)],
            "feedback": {"store": state["store"] is not None,
                         "keep_images": state["store"] is not None and state["store"].keep_images},
            # Read back from the compiled engine now: a seed .pth is checked on
            # its first large batch and may move to bf16 then.
            "engine": str(run), "precision": precision_reason(clf, run),
            "labels": clf.labels, "display_names": clf.display_names, "human_label": clf.human_label,
            "threshold": clf.threshold, "bands": clf.bands, "preprocessing": clf.preprocessing,
            "backbone": meta["backbone"]["name"], "metrics": clf.info.get("metrics"),
            "weak_spots": served.weak_spots or clf.info.get("warnings", []),
            "limits": asdict(limits), "version": __version__,
            "served": dict(state["batcher"].stats),
        }

    @app.post("/v1/analyze", response_model=None,
              responses={200: {"model": Analysis}, **errors(400, 401, 408, 413, 422, 429, 503)})
    async def analyze(files: list[UploadFile] = File(..., description="one or more images"),
                      heatmap: bool = Query(False, description="include each crop's p_ai (the patch map)")):
        """Analyse uploaded images: one result per file, in upload order."""
        if not state["ready"]:
            raise HTTPException(503, "the model is loading", headers={"Retry-After": "2"})
        if not files:
            raise HTTPException(400, "no files: upload one or more images in the field 'files'")
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} files: at most {limits.max_files} per request")
        loop = asyncio.get_running_loop()
        results, images, slots = [], [], []
        for upload in files:
            data = await upload.read()
            started = time.perf_counter()
            result, image = await loop.run_in_executor(None, _read_upload, upload.filename or "upload", data)
            result["timings_ms"] = {"decode": round(1000 * (time.perf_counter() - started), 1)}
            results.append(result)
            if image is not None:
                images.append(image)
                slots.append(len(results) - 1)
        if images:
            started = time.perf_counter()
            try:
                preds = await asyncio.wait_for(state["batcher"].submit(images), limits.request_timeout_s)
            except (Busy, asyncio.TimeoutError):
                raise HTTPException(503, "the server is busy: retry shortly", headers={"Retry-After": "1"})
            infer_ms = round(1000 * (time.perf_counter() - started), 1)
            for slot, (p, served) in zip(slots, preds):
                _fill(results[slot], p, served, heatmap, infer_ms)
                remember(state["answers"], results[slot])
        if not images:
            return JSONResponse({"results": results, "error": "none of the files could be read"},
                                status_code=422)
        return {"results": results}

    review_routes(app, state, limits)
    return app


def _on_hangup(deploy):
    """On SIGHUP, deploy the checkpoint the service was started with again (after
    its file or link changed); returns what removes the handler.  Only where the
    event loop runs in the main thread (``imageorigin serve``), not in a test client's."""
    loop = asyncio.get_running_loop()

    async def reload():
        try:
            done = await deploy()
            print(f"imageorigin: SIGHUP: {done['outcome']}: model {done['id']}", file=sys.stderr, flush=True)
        except Exception as err:  # noqa: BLE001 - a failed reload leaves the model in service as it was
            print(f"imageorigin: SIGHUP: model not swapped: {err}", file=sys.stderr, flush=True)

    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return lambda: None
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def _read_upload(name: str, data: bytes) -> tuple[dict, Image.Image | None]:
    """A result with the file's identity and provenance, and its decoded image (None on error)."""
    result = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
              "format": None, "width": None, "height": None, "error": None, "warnings": [],
              "provenance": {"summary": "none", "evidence": []}}
    if not data:
        result["error"] = f"{name}: empty file (0 bytes)"
        return result, None
    result["_provenance"] = provenance.read(data)
    try:
        image = decode_image(data, name=name)
    except ImageDecodeError as err:
        result["error"] = str(err)
        result["provenance"] = {"summary": provenance.summarise(result.pop("_provenance"), None),
                                "evidence": []}
        return result, None
    result["format"], (result["width"], result["height"]) = image.format, image.size
    result["warnings"] = image.info.get("warnings", [])
    return result, image


def _fill(result: dict, p: Prediction, served: Served, heatmap: bool, infer_ms: float) -> None:
    """Add the pixel verdict, the model that gave it and the provenance summary to a file's result."""
    clf = served.model
    ev = result.pop("_provenance")
    result.update({
        "label": p.label, "probs": p.probs, "p_ai": p.p_ai, "threshold": clf.threshold,
        "is_ai": p.is_ai, "verdict": p.verdict, "caveats": p.caveats,
        # The engine read back from the model that answered (a seed .pth may move to bf16).
        "model": {"id": served.id, "engine": str(current_engine(clf))},
        "provenance": {"summary": provenance.summarise(ev, p.verdict), **ev},
    })
    if heatmap:
        result["heatmap"] = p.patches
    result["timings_ms"]["queue_and_inference"] = infer_ms
