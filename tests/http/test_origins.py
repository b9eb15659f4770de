"""Cross-site requests: a web page may call the server only from an allowed Origin (as ollama).

A browser lets any page send a "simple" request (a text/plain POST) to any address without a
preflight; only the Origin header says where it comes from. Refusing unknown origins stops a
page from running generations against a local server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import Server, tiny_home

from tandem.gateway.http.middleware import OriginPolicy

GENERATE = '{"model": "tiny", "prompt": "x", "stream": false, "options": {"num_predict": 2}}'


def simple_post(server: Server, origin: str | None, path: str = "/api/generate") -> httpx.Response:
    """What a page's fetch(url, {method: "POST", body}) sends: text/plain, no preflight."""
    headers = {"Content-Type": "text/plain;charset=UTF-8"} | ({"Origin": origin} if origin else {})
    return httpx.post(server.url + path, content=GENERATE, headers=headers, timeout=30)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost", True),
        ("http://localhost:3000", True),
        ("https://127.0.0.1:8443", True),
        ("http://0.0.0.0:80", True),
        ("http://[::1]:5173", True),
        ("app://obsidian.md", True),
        ("file://", True),
        ("tauri://localhost", True),
        ("vscode-webview://1234abcd", True),
        ("HTTP://LOCALHOST:3000", True),
        ("http://evil.example", False),
        ("http://localhost.evil.example", False),
        ("http://127.0.0.1.evil.example:80", False),
        ("ftp://localhost", False),
        ("null", False),  # sandboxed iframes and data: pages
        ("", False),
    ],
)
def test_default_origin_policy(origin: str, allowed: bool) -> None:
    assert OriginPolicy().allows(origin) == allowed


def test_origin_patterns() -> None:
    policy = OriginPolicy(["https://*.example.com", "http://app.test:8080/"])
    assert policy.allows("https://a.example.com") and policy.allows("https://a.b.example.com")
    assert not policy.allows("https://example.com") and not policy.allows("http://a.example.com")
    assert not policy.allows("https://a.example.com.evil.test")
    assert policy.allows("http://app.test:8080") and not policy.allows("http://app.test:8081")
    assert OriginPolicy(["*"]).allows("http://anything.example")
    for bad in ("example.com", "http://example.com/path", "http://a b", "*.example.com"):
        with pytest.raises(ValueError, match="origin"):
            OriginPolicy([bad])


def test_cross_site_post_from_unknown_origin_is_403(tiny_server: Server) -> None:
    r = simple_post(tiny_server, "http://evil.example")
    assert r.status_code == 403, r.text
    assert "origin 'http://evil.example' is not allowed" in r.json()["error"]
    assert "access-control-allow-origin" not in r.headers  # the page cannot even read the refusal
    r = simple_post(tiny_server, "http://evil.example", "/v1/completions")
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_allowed_origin_works_and_gets_cors_headers(tiny_server: Server) -> None:
    r = simple_post(tiny_server, "http://localhost:3000")
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "Origin" in r.headers.get_list("vary")
    r = simple_post(tiny_server, None)  # clients that are not browsers send no Origin
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_preflight(tiny_server: Server) -> None:
    ask = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization, x-stainless-os",
    }
    r = httpx.options(tiny_server.url + "/v1/chat/completions", headers=ask, timeout=10)
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "content-type, authorization, x-stainless-os"
    del ask["Access-Control-Request-Headers"]
    r = httpx.options(tiny_server.url + "/api/chat", headers=ask, timeout=10)
    assert r.status_code == 204 and "X-Stainless-Retry-Count" in r.headers["access-control-allow-headers"]
    r = httpx.options(
        tiny_server.url + "/api/chat", headers={**ask, "Origin": "http://evil.example"}, timeout=10
    )
    assert r.status_code == 403


@pytest.fixture(scope="module")
def origins_server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    s = Server(
        tiny_home(tmp_path_factory, tiny_gguf),
        args=("--origins", "https://*.example.com", "--origins", "http://app.test:8080"),
    )
    s.env["TANDEM_ORIGINS"] = "http://env-one.test, http://env-two.test"
    s.start()
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("https://ui.example.com", 200),  # --origins, a pattern
        ("http://app.test:8080", 200),  # --origins
        ("http://env-one.test", 200),  # TANDEM_ORIGINS
        ("http://env-two.test", 200),
        ("http://localhost:3000", 200),  # the defaults stay
        ("https://example.com", 403),
        ("http://app.test:9090", 403),
        ("http://evil.example", 403),
    ],
)
def test_origins_option_and_env_extend_the_list(origins_server: Server, origin: str, status: int) -> None:
    r = simple_post(origins_server, origin)
    assert r.status_code == status, r.text
    if status == 200:
        assert r.headers["access-control-allow-origin"] == origin


def test_invalid_origin_is_refused_at_startup(tmp_path: Path) -> None:
    env = {**os.environ, "TANDEM_HOME": str(tmp_path), "TANDEM_ORIGINS": "example.com"}
    r = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "serve", "--model", "none"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert "TANDEM_ORIGINS" in r.stderr and "'example.com'" in r.stderr
