"""Shared fixtures: real images from ../shared (override with IMAGEORIGIN_SHARED)."""

import contextlib
import os
import shutil
import tempfile
import threading
from pathlib import Path

import anyio
import pytest

from serving import free_port, wait_ready

# anyio imports its parts on first use, and pytest rewrites the asserts of every
# module of a plugin's package (anyio is one): a first use inside a server's
# thread (the first file response reads through anyio.open_file) then runs
# ast.parse in that thread, which CPython 3.11 sometimes fails with "SystemError:
# AST constructor recursion depth mismatch" (python/cpython#106905; seen once in
# CI here). Importing every part now, on the main thread, leaves none to import there.
for _name in dir(anyio):
    if not _name.startswith("_"):
        getattr(anyio, _name)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMAGEORIGIN_SHARED", REPO.parent / "shared"))
BENCH = SHARED / "dh3-bench"
RAW = SHARED / "raw-samples"


def pytest_configure(config):
    # The suite runs the same on any host, whatever its user has set:
    # - no imageorigin setting of the host's (an API key, service limits, a device)
    #   reaches the code under test; converted models, cached features and
    #   remembered precision checks go to a folder of this run, never a user's cache;
    for name in [n for n in os.environ if n.startswith("IMAGEORIGIN_") and n not in ("IMAGEORIGIN_SHARED",
                                                                                     "IMAGEORIGIN_CHROMIUM")]:
        del os.environ[name]
    os.environ["IMAGEORIGIN_CACHE"] = tempfile.mkdtemp(prefix="imageorigin-test-cache-")
    # - on the CPU, even where a GPU is visible (this runs before torch is imported);
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    # - and the test servers on 127.0.0.1 are reached directly, never through a proxy.
    for name in ("NO_PROXY", "no_proxy"):
        os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
    if not (BENCH / "manifest.csv").is_file() or not (RAW / "manifest.csv").is_file():
        raise pytest.UsageError(
            f"test data not found under {SHARED}: put the shared folder beside the repository "
            "or set IMAGEORIGIN_SHARED"
        )


@pytest.fixture(scope="session")
def shared() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def bench() -> Path:
    return BENCH


@pytest.fixture(scope="session")
def raw() -> Path:
    return RAW


@pytest.fixture(scope="session")
def raw_files(raw) -> list[Path]:
    return sorted(p for p in raw.rglob("*") if p.is_file() and p.name != "manifest.csv")


@pytest.fixture
def small_folder(tmp_path, bench):
    """A labelled folder with ``n`` real bench images per class (copied into tmp)."""

    def make(n: int = 6, classes=("dalle", "human", "other_ai"), view="resized/train") -> Path:
        root = tmp_path / f"data_{n}_{len(classes)}"
        for c in classes:
            (root / c).mkdir(parents=True)
            for f in sorted((bench / view / c).iterdir())[:n]:
                shutil.copy(f, root / c / f.name)
        return root

    return make


@contextlib.contextmanager
def served(app, headers: dict | None = None):
    """``app`` under a real uvicorn server on a free port of 127.0.0.1, in a thread,
    once /readyz answers (sent with ``headers``); yields (url, port)."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, headers)
    try:
        yield url, port
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
