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
import hmac
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
from .images import ImageDecodeError, decode_image, max_pixels
from .model import default_model_path, load
from .predict import Prediction, current_engine, precision_reason, predict
from .schemas import Analysis, ModelInfo, Status, errors


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


async def _send_json(send, status: int, error: str, headers: list | None = None) -> None:
    body = JSONResponse({"error": error}, status_code=status).body
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# The page and the API: only this origin's own files, no inline script, no
# plugins, never framed.  Images the page draws come from blob: URLs it makes.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def load_api_keys(keys: list[str] | None = None, key_file: str | os.PathLike | None = None) -> list[str]:
    """The API keys in force: ``keys``, the environment's ``IMAGEORIGIN_API_KEY``
    (comma-separated), and a file of keys (one per line, # comments)."""
    found = [k for k in (keys or []) if k]
    found += [k.strip() for k in os.environ.get("IMAGEORIGIN_API_KEY", "").split(",") if k.strip()]
    if key_file:
        for line in Path(key_file).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                found.append(line.strip())
    short = [k for k in found if len(k) < 16]
    if short:
        raise ValueError(f"{len(short)} API key(s) under 16 characters: use long random keys "
                         "(python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return found


def check_bind(host: str, keys: list[str], insecure: bool = False) -> None:
    """Refuse to serve anything but a loopback address without an API key."""
    import ipaddress

    if keys or insecure or host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to serve on {host} without an API key: anyone who can reach it could use "
                     "it. Give --api-key (or IMAGEORIGIN_API_KEY, or --api-key-file), or --insecure-bind "
                     "if something in front of it already lets in only whom it should")


class Guard:
    """ASGI middleware, outermost: security headers on every answer, the API key
    (all but /healthz) and each client's rate limit (all but /healthz)."""

    def __init__(self, app, keys: list[str], limits: Limits, csp: dict[str, str] | None = None):
        self.app, self.limits = app, limits
        self.keys = [k.encode() for k in keys]
        self.csp = csp or {}  # path -> its policy, where it differs from CSP
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)

    def _authorised(self, headers: dict) -> bool:
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        elif auth[:6].lower() == b"basic ":
            try:
                given = base64.b64decode(auth[6:].strip(), validate=True).partition(b":")[2]
            except ValueError:
                given = b""
        # Every key compared, each in constant time: neither the time nor the
        # count of comparisons says how much of a key was right.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    def _wait(self, client: str) -> float:
        """0 if ``client`` may go on now, else the seconds until it may."""
        rate = self.limits.rate_per_minute / 60.0
        if rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens, last = self.buckets.pop(client, (float(self.limits.rate_burst), now))
        tokens = min(float(self.limits.rate_burst), tokens + (now - last) * rate)
        if len(self.buckets) >= 10_000:  # forget the longest-idle client (insertion order)
            self.buckets.pop(next(iter(self.buckets)))
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / rate
        self.buckets[client] = (tokens - 1, now)
        return 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"x-content-type-options", b"nosniff"),
                                      (b"content-security-policy", self.csp.get(scope["path"], CSP).encode()),
                                      (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
            await send(message)

        if scope["path"] != "/healthz":
            if self.keys and not self._authorised(dict(scope["headers"])):
                return await _send_json(secured, 401, "an API key is needed: Authorization: Bearer KEY, "
                                        "X-API-Key: KEY, or HTTP Basic with the key as password",
                                        [(b"www-authenticate", b'Basic realm="imageorigin", charset="UTF-8"')])
            wait = self._wait((scope.get("client") or ("?",))[0])
            if wait:
                return await _send_json(secured, 429, "too many requests from this client: slow down",
                                        [(b"retry-after", str(max(1, round(wait + 0.5))).encode())])
        await self.app(scope, receive, secured)


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


def create_app(model: str = "default", limits: Limits | None = None, api_keys: list[str] | None = None) -> FastAPI:
    """The service's application: load ``model`` at start-up (``"default"`` or a path).
    With ``api_keys``, every endpoint but /healthz needs one of them."""
    limits = limits or Limits()
    state: dict = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        clf = await loop.run_in_executor(None, load, model)
        path = default_model_path() if str(model) == "default" else Path(model)
        state.update(model=clf, sha256=_sha256_file(path), batcher=Batcher(clf, limits),
                     weak_spots=weak_spots(path))
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
        clf = state["model"]
        meta = clf.describe()
        run = current_engine(clf)
        return {
            "id": state["sha256"], "sha256": state["sha256"],
            # Read back from the compiled engine now: a seed .pth is checked on
            # its first large batch and may move to bf16 then.
            "engine": str(run), "precision": precision_reason(clf, run),
            "labels": clf.labels, "display_names": clf.display_names, "human_label": clf.human_label,
            "threshold": clf.threshold, "bands": clf.bands, "preprocessing": clf.preprocessing,
            "backbone": meta["backbone"]["name"], "metrics": clf.info.get("metrics"),
            "weak_spots": state["weak_spots"] or clf.info.get("warnings", []),
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
            # Once a request, after its predictions: the engine they ran on, read back from it.
            engine = str(current_engine(state["model"]))
            for slot, p in zip(slots, preds):
                _fill(results[slot], p, state, heatmap, infer_ms, engine)
        if not images:
            return JSONResponse({"results": results, "error": "none of the files could be read"},
                                status_code=422)
        return {"results": results}

    return app


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


def _fill(result: dict, p: Prediction, state: dict, heatmap: bool, infer_ms: float, engine: str) -> None:
    """Add the pixel verdict and the provenance summary to a file's result."""
    clf = state["model"]
    ev = result.pop("_provenance")
    result.update({
        "label": p.label, "probs": p.probs, "p_ai": p.p_ai, "threshold": clf.threshold,
        "is_ai": p.is_ai, "verdict": p.verdict, "caveats": p.caveats,
        "model": {"id": state["sha256"], "engine": engine},
        "provenance": {"summary": provenance.summarise(ev, p.verdict), **ev},
    })
    if heatmap:
        result["heatmap"] = p.patches
    result["timings_ms"]["queue_and_inference"] = infer_ms
