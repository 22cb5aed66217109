"""Who gets in: API keys, the loopback-only default, rate limits, slow clients,
security headers and closed CORS; a keyed server used by a real browser."""

import base64
import socket
import time
import urllib.error
import urllib.request

import pytest
from fastapi.testclient import TestClient

from conftest import SHARED, served
from serving import CHROMIUM, serve_process
from imageorigin.cli import main
from imageorigin.service import Limits, check_bind, create_app, load_api_keys

KEY = "test-key-0123456789abcdef"
PHOTO = SHARED / "raw-samples/human/bsds500__real_photo__test_65084.jpg"


@pytest.fixture(scope="module")
def keyed():
    with TestClient(create_app("default", Limits(rate_per_minute=0), api_keys=[KEY, "another-key-0123456789"])) as c:
        yield c


def test_every_endpoint_but_healthz_needs_a_key(keyed):
    assert keyed.get("/healthz").status_code == 200
    for path in ("/readyz", "/v1/model", "/", "/static/app.js", "/openapi.json", "/docs"):
        r = keyed.get(path)
        assert r.status_code == 401, path
        assert "API key" in r.json()["error"] and r.headers["www-authenticate"].startswith("Basic")
    upload = [("files", ("p.jpg", PHOTO.read_bytes(), "image/jpeg"))]
    assert keyed.post("/v1/analyze", files=upload).status_code == 401
    basic = base64.b64encode(f"moderator:{KEY}".encode()).decode()
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": "another-key-0123456789"},
                    {"Authorization": f"Basic {basic}"}):
        assert keyed.get("/v1/model", headers=headers).status_code == 200, headers
    r = keyed.post("/v1/analyze", files=upload, headers={"X-API-Key": KEY})
    assert r.status_code == 200 and r.json()["results"][0]["verdict"]
    for wrong in ({"Authorization": "Bearer " + KEY[:-1]}, {"X-API-Key": KEY + "x"},
                  {"Authorization": "Basic !!!"}, {"Authorization": f"Bearer {KEY[:8]}"}):
        assert keyed.get("/v1/model", headers=wrong).status_code == 401, wrong


def test_keys_from_flag_environment_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEORIGIN_API_KEY", "env-key-0123456789abc, second-env-key-0123456")
    f = tmp_path / "keys.txt"
    f.write_text("# moderation team\nfile-key-0123456789abcd\n\n")
    assert load_api_keys(["flag-key-0123456789abc"], f) == [
        "flag-key-0123456789abc", "env-key-0123456789abc", "second-env-key-0123456", "file-key-0123456789abcd"]
    with pytest.raises(ValueError, match="under 16 characters"):
        load_api_keys(["short"])


def test_no_key_means_loopback_only(capsys, monkeypatch):
    monkeypatch.delenv("IMAGEORIGIN_API_KEY", raising=False)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_bind(host, [])
    for host in ("0.0.0.0", "192.168.1.20", "::", "example.org"):
        with pytest.raises(ValueError, match="refusing to serve"):
            check_bind(host, [])
        check_bind(host, [KEY])
        check_bind(host, [], insecure=True)
    # the command refuses before loading anything or binding
    assert main(["serve", "--host", "0.0.0.0", "--port", "9"]) == 2
    assert "refusing to serve on 0.0.0.0 without an API key" in capsys.readouterr().err


def test_security_headers_and_closed_cors(keyed):
    auth = {"X-API-Key": KEY}
    page = keyed.get("/", headers=auth)
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    docs = keyed.get("/docs", headers=auth)
    assert "script-src 'self' 'sha256-" in docs.headers["content-security-policy"]  # its one inline script
    # another site's page: no CORS grant on answers or preflights
    r = keyed.get("/v1/model", headers={**auth, "Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = keyed.options("/v1/analyze", headers={"Origin": "https://evil.example",
                                               "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in pre.headers and pre.status_code < 500


def test_rate_limit_answers_429_with_retry_after():
    with TestClient(create_app("default", Limits(rate_per_minute=60, rate_burst=3))) as c:
        codes = [c.get("/v1/model").status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = c.get("/v1/model")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 2 and "slow down" in r.json()["error"]
        assert c.get("/healthz").status_code == 200  # liveness is never limited
        time.sleep(1.1)  # one token a second comes back
        assert c.get("/v1/model").status_code == 200


def test_forwarded_for_is_trusted_only_from_the_proxies_named():
    """The rate limit keys on the client's address: a client cannot forge
    X-Forwarded-For to get a fresh bucket, but behind a proxy named by
    --forwarded-allow-ips each forwarded client has its own."""
    def status(url, forwarded):
        request = urllib.request.Request(url + "/v1/model", headers={"X-Forwarded-For": forwarded})
        try:
            return urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as err:
            return err.code

    limit = ("--rate-burst", "3", "--rate-per-minute", "1")  # /readyz, polled before, spends some too
    with serve_process(*limit) as (url, _, _):
        assert [status(url, f"10.0.0.{i}") for i in range(4)][-1] == 429
    with serve_process(*limit, "--forwarded-allow-ips", "127.0.0.1") as (url, _, _):
        assert [status(url, f"10.0.0.{i}") for i in range(4)] == [200] * 4
        assert [status(url, "10.0.0.9") for _ in range(4)] == [200, 200, 200, 429]


@pytest.fixture(scope="module")
def keyed_server():
    """A real uvicorn server with a key and a 2 s body timeout, on 127.0.0.1."""
    app = create_app("default", Limits(body_timeout_s=2.0), api_keys=[KEY])
    with served(app, {"X-API-Key": KEY}) as (url, port):
        yield url, port


def test_a_client_trickling_its_body_is_cut_off_and_holds_no_one_up(keyed_server):
    url, port = keyed_server
    slow = socket.create_connection(("127.0.0.1", port))
    slow.sendall(f"POST /v1/analyze HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Length: 100000\r\n"
                 "Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n".encode())
    started = time.perf_counter()
    answer = b""
    slow.settimeout(0.3)
    while time.perf_counter() - started < 10 and b"\r\n\r\n" not in answer:
        try:
            slow.sendall(b"x")  # one byte every 0.3 s
        except OSError:
            pass
        try:
            answer += slow.recv(4096)
        except socket.timeout:
            pass
        # meanwhile another client is served at once
        if 0.5 < time.perf_counter() - started < 0.9:
            r = urllib.request.urlopen(urllib.request.Request(url + "/v1/model", headers={"X-API-Key": KEY}),
                                       timeout=5)
            assert r.status == 200
    took = time.perf_counter() - started
    slow.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer
    assert 1.5 < took < 6


def test_the_page_behind_a_key_in_a_real_browser(keyed_server):
    from playwright.sync_api import sync_playwright

    url, _ = keyed_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # The browser asks for the key once (HTTP Basic) and sends it with the page's own requests.
        page = browser.new_page(http_credentials={"username": "moderator", "password": KEY})
        violations = []
        page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
        page.goto(url + "/")
        page.wait_for_selector("#model p")
        page.set_input_files("#picker", [str(PHOTO)])
        page.wait_for_selector("text=Done: 1 image analysed.", timeout=60000)
        assert "Likely made by a person" in page.inner_text("article.card")
        page.goto(url + "/docs")  # Swagger UI's inline start-up script is allowed by its hash
        page.wait_for_selector(".swagger-ui .info .title", timeout=20000)
        assert violations == []
        browser.close()
