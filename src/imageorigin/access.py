"""Who may use the service and how much: API keys, each client's rate, security headers.

:class:`Guard` is the outermost ASGI layer of :func:`imageorigin.service.create_app`
(see the service's docstring for the rules); :func:`load_api_keys` and
:func:`check_bind` are what ``imageorigin serve`` checks before it starts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from pathlib import Path

from fastapi.responses import JSONResponse


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


def given_key(headers: dict) -> bytes:
    """The API key a request carries (b"" for none); ``headers``: lower-case bytes -> bytes."""
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return auth[7:].strip()
    if auth[:6].lower() == b"basic ":
        try:
            return base64.b64decode(auth[6:].strip(), validate=True).partition(b":")[2]
        except ValueError:
            return b""
    return headers.get(b"x-api-key", b"")


def key_id(headers: dict) -> str | None:
    """Which key sent a request, without the key: the first 8 hex of its SHA-256."""
    key = given_key(headers)
    return hashlib.sha256(key).hexdigest()[:8] if key else None


class Guard:
    """ASGI middleware, outermost: security headers on every answer, the API key
    (all but /healthz) and each client's rate limit (all but /healthz)."""

    def __init__(self, app, keys: list[str], limits, csp: dict[str, str] | None = None):
        self.app, self.limits = app, limits
        self.keys = [k.encode() for k in keys]
        self.csp = csp or {}  # path -> its policy, where it differs from CSP
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)

    def _authorised(self, headers: dict) -> bool:
        given = given_key(headers)
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
