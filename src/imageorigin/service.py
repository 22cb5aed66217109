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
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
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
from .engine import cached_engine
from .images import ImageDecodeError, decode_image, max_pixels
from .model import default_model_path, load
from .predict import Prediction, predict


def _env(name: str, default: float) -> float:
    return type(default)(os.environ.get(f"IMAGEORIGIN_{name.upper()}", default))


@dataclass
class Limits:
    """Every limit of the service; each is a flag of ``imageorigin serve`` and an
    environment variable ``IMAGEORIGIN_<NAME>`` (e.g. IMAGEORIGIN_MAX_FILES)."""

    max_request_bytes: int = field(default_factory=lambda: _env("max_request_bytes", 64 << 20))
    max_files: int = field(default_factory=lambda: _env("max_files", 32))
    max_batch: int = field(default_factory=lambda: _env("max_batch", 32))
    max_wait_ms: float = field(default_factory=lambda: _env("max_wait_ms", 10.0))
    max_queue: int = field(default_factory=lambda: _env("max_queue", 256))
    max_pixels: int = field(default_factory=max_pixels)


class Busy(Exception):
    """The queue is full: the client should retry later."""


class Batcher:
    """Gathers the images of concurrent requests into shared ``predict`` calls.

    One background task takes images off a queue, waits up to ``max_wait_ms``
    for more (at most ``max_batch``), and runs the batch on one inference
    thread; each caller awaits its own images' predictions.
    """

    def __init__(self, model, limits: Limits):
        self.model, self.limits = model, limits
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

    async def submit(self, images: list[Image.Image]) -> list[Prediction]:
        """Predictions for ``images``, in order; raises Busy when the queue is full."""
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

    def _predict(self, images: list[Image.Image]) -> list[Prediction]:
        return list(predict(self.model, images, batch_size=self.limits.max_batch))


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413, whether it
    says so in Content-Length or only while streaming in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_json(send, 413, f"request body of {int(length)} bytes is over the "
                                               f"limit of {self.limit} bytes")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, f"request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


async def _send_json(send, status: int, error: str) -> None:
    body = JSONResponse({"error": error}, status_code=status).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def weak_spots(checkpoint: Path) -> list[str]:
    """The known weak spots of a model: the bullets of the Limitations sections of
    its card, the Markdown file beside the checkpoint (``<name>.md``, or the
    ``MODEL_CARD.md`` that ``train`` writes into the run folder)."""
    for card in (checkpoint.with_suffix(".md"), checkpoint.parent / "MODEL_CARD.md"):
        if card.is_file():
            break
    else:
        return []
    spots, inside = [], False
    for line in card.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            inside = "imitation" in line
        elif inside and line.startswith("- "):
            spots.append(line[2:].strip())
        elif inside and spots and line.startswith("  ") and line.strip():
            spots[-1] += " " + line.strip()  # a bullet's continuation line
    return [re.sub(r"\*\*|`", "", s) for s in spots]


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def create_app(model: str = "default", limits: Limits | None = None) -> FastAPI:
    """The service's application: load ``model`` at start-up (``"default"`` or a path)."""
    limits = limits or Limits()
    state: dict = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        clf = await loop.run_in_executor(None, load, model)
        path = default_model_path() if str(model) == "default" else Path(model)
        state.update(model=clf, sha256=_sha256_file(path), batcher=Batcher(clf, limits),
                     weak_spots=weak_spots(path))
        state["engine"] = str(cached_engine(clf, "auto", clf.inference_precision, clf.preprocessing["crop"]))
        state["batcher"].start()
        # Warm up: the first forward pass compiles the engine and fills caches.
        await state["batcher"].submit([Image.new("RGB", (256, 256), (128, 96, 64))])
        state["ready"] = True
        yield
        state["ready"] = False
        await state["batcher"].stop()

    app = FastAPI(title="imageorigin", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Tell whether an image was made by a person, by DALL-E, or by another AI "
                              "generator: evidence for a person to weigh, not proof.")
    app.add_middleware(_BodyLimit, limit=limits.max_request_bytes)
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
        return get_swagger_ui_html(openapi_url="/openapi.json", title="imageorigin API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    @app.get("/healthz")
    async def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Readiness: 503 until the model is loaded and warm."""
        if not state["ready"]:
            return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": "2"})
        return {"status": "ready"}

    @app.get("/v1/model")
    async def model_info():
        """The model: labels, verdict cut-points, preprocessing, checkpoint hash, metrics,
        known weak spots, and the server's limits."""
        if not state["ready"]:
            raise HTTPException(503, "the model is loading", headers={"Retry-After": "2"})
        clf = state["model"]
        meta = clf.describe()
        return {
            "id": state["sha256"], "sha256": state["sha256"], "engine": state["engine"],
            "labels": clf.labels, "display_names": clf.display_names, "human_label": clf.human_label,
            "threshold": clf.threshold, "bands": clf.bands, "preprocessing": clf.preprocessing,
            "backbone": meta["backbone"]["name"], "metrics": clf.info.get("metrics"),
            "weak_spots": state["weak_spots"] or clf.info.get("warnings", []),
            "limits": asdict(limits), "version": __version__,
            "served": dict(state["batcher"].stats),
        }

    @app.post("/v1/analyze")
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
                preds = await state["batcher"].submit(images)
            except Busy:
                raise HTTPException(503, "the server is busy: retry shortly", headers={"Retry-After": "1"})
            infer_ms = round(1000 * (time.perf_counter() - started), 1)
            for slot, p in zip(slots, preds):
                _fill(results[slot], p, state, heatmap, infer_ms)
        if not images:
            return JSONResponse({"results": results, "error": "none of the files could be read"},
                                status_code=422)
        return {"results": results}

    return app


def _read_upload(name: str, data: bytes) -> tuple[dict, Image.Image | None]:
    """A result with the file's identity and provenance, and its decoded image (None on error)."""
    result = {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
              "format": None, "width": None, "height": None, "error": None,
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
    return result, image


def _fill(result: dict, p: Prediction, state: dict, heatmap: bool, infer_ms: float) -> None:
    """Add the pixel verdict and the provenance summary to a file's result."""
    clf = state["model"]
    ev = result.pop("_provenance")
    result.update({
        "label": p.label, "probs": p.probs, "p_ai": p.p_ai, "threshold": clf.threshold,
        "is_ai": p.is_ai, "verdict": p.verdict, "caveats": p.caveats,
        "model": {"id": state["sha256"], "engine": state["engine"]},
        "provenance": {"summary": provenance.summarise(ev, p.verdict), **ev},
    })
    if heatmap:
        result["heatmap"] = p.patches
    result["timings_ms"]["queue_and_inference"] = infer_ms
