"""/metrics, /health, the Host header guard (DNS rebinding), the body-size limit, loopback binding."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from live_server import Server
from prometheus_client.parser import text_string_to_metric_families

MAX_BODY = 8 * 2**20  # ServeConfig.max_body_bytes
TINY = (("model", "tiny:latest"),)  # the label of every per-model metric


def scrape(server: Server) -> dict[str, dict[tuple, float]]:
    r = httpx.get(server.url + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_cover_requests_queue_kv_tokens_latency(server_after_traffic: Server) -> None:
    m = scrape(server_after_traffic)
    ok = m["tandem_http_requests_total"][(("route", "/api/generate"), ("status", "200"))]
    assert ok >= 2
    assert m["tandem_http_requests_total"][(("route", "/api/generate"), ("status", "404"))] >= 1
    assert m["tandem_http_requests_total"][(("route", "/v1/chat/completions"), ("status", "200"))] >= 1
    for gauge in (
        "tandem_queue_depth",
        "tandem_running_sequences",
        "tandem_kv_blocks_used",
        "tandem_kv_blocks_free",
    ):
        assert m[gauge][TINY] >= 0
    assert (
        m["tandem_kv_blocks_used"][TINY] + m["tandem_kv_blocks_free"][TINY]
        == m["tandem_kv_blocks_total"][TINY]
    )
    assert m["tandem_prompt_tokens_total"][TINY] > 0 and m["tandem_generation_tokens_total"][TINY] >= 10
    assert m["tandem_time_to_first_token_seconds_count"][TINY] >= 2
    assert m["tandem_inter_token_latency_seconds_count"][TINY] >= 8
    assert m["tandem_step_time_seconds"][TINY] > 0 and m["tandem_gpu_idle_seconds"][TINY] >= 0
    assert m["tandem_overlap_enabled"][TINY] == 1 and m["tandem_worker_alive"][TINY] == 1
    assert m["tandem_request_outcomes_total"][(*TINY, ("reason", "length"))] >= 2


@pytest.fixture(scope="module")
def server_after_traffic(tiny_server: Server) -> Server:
    with tiny_server.client() as c:
        for _ in range(2):
            body = {
                "model": "tiny",
                "prompt": "count",
                "stream": False,
                "options": {"num_predict": 5, "ignore_eos": True},
            }
            assert c.post("/api/generate", json=body).status_code == 200
        assert c.post("/api/generate", json={"model": "nope", "prompt": "x"}).status_code == 404
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
    return tiny_server


def test_health(tiny_server: Server) -> None:
    r = httpx.get(tiny_server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("localhost:{port}", True),
        ("127.0.0.1:{port}", True),
        ("127.0.0.2", True),
        ("[::1]:{port}", True),
        ("app.localhost", True),
        ("tandem.example", True),  # --allowed-host
        ("TANDEM.example:{port}", True),
        ("evil.example", False),
        ("evil.example:{port}", False),
        ("localhost.evil.example", False),
        ("10.1.2.3", False),
        ("tandem.example.evil", False),
    ],
)
def test_host_header_guard(tiny_server: Server, host: str, allowed: bool) -> None:
    headers = {"Host": host.format(port=tiny_server.port)}
    r = httpx.get(tiny_server.url + "/api/tags", headers=headers, timeout=10)
    assert r.status_code == (200 if allowed else 403), r.text
    if not allowed:
        assert "not allowed" in r.json()["error"]
        r = httpx.post(tiny_server.url + "/v1/chat/completions", headers=headers, json={}, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


MALFORMED_HOSTS = [
    "localhost:evil",
    "localhost:0",
    "localhost:65536",
    "localhost:+80",
    "localhost:80:80",
    "localhost:",
    "127.0.0.1:８０",  # fullwidth digits: str.isdigit() says yes
    "::1",  # IPv6 needs brackets
    "[::1]x",
    "[::1",
    "[localhost]",
    ":11434",
    "local host",
]


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("Example.COM:8080", "example.com"),
        ("localhost.", "localhost"),
        ("127.0.0.1:65535", "127.0.0.1"),
        ("[::1]:1", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        *((h, None) for h in MALFORMED_HOSTS),
        (" 127.0.0.1", None),  # no trimming: any whitespace is refused
        ("127.0.0.1 ", None),
        ("localhost\t", None),
        ("", None),
        (".", None),
        ("a..localhost", None),
        ("[fe80::1%25eth0]", None),
    ],
)
def test_host_name_parses_strictly(header: str, name: str | None) -> None:
    from tandem.gateway.http.middleware import host_allowed, host_name

    assert host_name(header) == name
    assert host_allowed(header, frozenset({"example.com"})) == (name is not None)


@pytest.mark.parametrize("host", [h.encode() for h in MALFORMED_HOSTS if h.isascii()])
def test_malformed_host_refused_over_a_socket(tiny_server: Server, host: bytes) -> None:
    """Raw bytes, so that no client library normalises the header on the way."""
    with socket.create_connection(("127.0.0.1", tiny_server.port), timeout=10) as s:
        s.sendall(b"GET /api/version HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403 "), reply
    assert "not allowed" in json.loads(body)["error"]


def test_body_size_limit(tiny_server: Server) -> None:
    big = json.dumps({"model": "tiny", "prompt": "x" * (MAX_BODY + 10)}).encode()
    r = httpx.post(tiny_server.url + "/api/generate", content=big, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 2**20):
            yield big[i : i + 2**20]

    r = httpx.post(tiny_server.url + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert httpx.get(tiny_server.url + "/health", timeout=10).status_code == 200


def test_binds_loopback_by_default(tiny_server: Server) -> None:
    info = json.loads((tiny_server.home / "run" / "server.json").read_text())
    assert info["http"] == f"http://127.0.0.1:{tiny_server.port}"
    assert info["pid"] == tiny_server.proc.pid and info["model"] == "tiny:latest"
    # the commands find the record where the server writes it
    from tandem.commands.ps import server_info_path as client_side
    from tandem.gateway.server import server_info_path as server_side

    assert client_side() == server_side()
