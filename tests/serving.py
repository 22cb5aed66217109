"""Real servers on 127.0.0.1 for the tests and the benchmarks: a free port, a
readiness wait, and an `imageorigin serve` process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request


# The browser the page's tests drive: Debian's chromium (what .ci/run installs),
# another on PATH, or the one IMAGEORIGIN_CHROMIUM names.
CHROMIUM = os.environ.get("IMAGEORIGIN_CHROMIUM") or shutil.which("chromium") \
    or shutil.which("chromium-browser") or "/usr/bin/chromium"


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, headers: dict | None = None, seconds: float = 30,
               process: subprocess.Popen | None = None) -> None:
    """Wait until the server at ``url`` answers /readyz with 200 (sent with
    ``headers``); raise RuntimeError after ``seconds``, or as soon as ``process``
    (the server's, when it is one) has exited."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with status {process.returncode} before it was ready")
        try:
            request = urllib.request.Request(url + "/readyz", headers=headers or {})
            if urllib.request.urlopen(request, timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server at {url} was not ready after {seconds} s")


@contextlib.contextmanager
def serve_process(*args: str, headers: dict | None = None, output=subprocess.DEVNULL, seconds: float = 60):
    """Start ``imageorigin serve --port P *args`` (its stdout and stderr to
    ``output``), wait until /readyz answers (a new process loads the model
    first), yield (url, port, process); stop it with SIGINT, as Ctrl-C would."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "imageorigin.cli", "serve", "--port", str(port), *args],
                              stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, headers, seconds, server)
        yield url, port, server
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
