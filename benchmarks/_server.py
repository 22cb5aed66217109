"""A real `imageorigin serve` process on a free port of 127.0.0.1, for the benchmarks."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request


@contextlib.contextmanager
def serve_process(*args: str, headers: dict | None = None):
    """Start ``imageorigin serve --port P *args`` (output discarded), wait until
    /readyz answers (sent with ``headers``), yield (url, port, process); stop it
    with SIGINT, as Ctrl-C would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "imageorigin.cli", "serve", "--port", str(port), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                ready = urllib.request.Request(url + "/readyz", headers=headers or {})
                if urllib.request.urlopen(ready, timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        yield url, port, server
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
