"""Security against hostile clients, over a live server: the Host header guard (DNS rebinding), the
body-size limit, loopback binding by default, model names that try to reach outside the store
(/api/pull, /api/show, /api/delete, /api/create, /api/copy: `../`, absolute paths, symlinks,
URL-encoded forms), and requests that try to make the server read a local path it was not given
(a file or FIFO outside --allow-local-models, a Modelfile FROM /etc/passwd).

Run: python -m pytest tests/stress/test_http_security.py -q
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import TINY_CONTEXT, Server, tiny_home

from tandem.formats.tiny import TinySpec, write_tiny_gguf

MAX_BODY = 8 * 2**20  # ServeConfig.max_body_bytes


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", TinySpec(context=TINY_CONTEXT))


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    server = Server(tiny_home(tmp_path_factory, tiny_gguf), args=("--allowed-host", "tandem.example")).start()
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


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


# -- names and paths that try to reach outside the store ---------------------------------------------
@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> dict[str, Path]:
    """An allowed folder, and outside it a valid model, a FIFO and a victim file; symlinks from the
    allowed folder to the outside ones."""
    import os

    root = tmp_path_factory.mktemp("paths")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "ok.gguf").write_bytes(tiny_gguf.read_bytes())
    (outside / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    (allowed / "link.gguf").symlink_to(outside / "tiny.gguf")
    (allowed / "sub").symlink_to(outside, target_is_directory=True)
    os.mkfifo(allowed / "fifo.gguf")
    os.mkfifo(outside / "fifo.gguf")
    (outside / "victim.txt").write_text("keep me")
    return {"root": root, "allowed": allowed, "outside": outside}


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, layout: dict[str, Path]
) -> Iterator[Server]:
    home = tiny_home(tmp_path_factory, tiny_gguf)
    (home / "victim.txt").write_text("keep me")  # beside the store, where `../` from it leads
    server = Server(home, args=("--allow-local-models", str(layout["allowed"]))).start()
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


def call(server: Server, method: str, path: str, body: dict) -> httpx.Response:
    # A FIFO opened for reading would block: the timeout is the check that nothing opens one.
    return httpx.request(method, server.url + path, content=json.dumps(body).encode(), timeout=20)


def tags(server: Server) -> set[str]:
    return {m["name"] for m in httpx.get(server.url + "/api/tags", timeout=10).json()["models"]}


def escapes(layout: dict[str, Path], home: Path) -> list[str]:
    a, o = layout["allowed"], layout["outside"]
    return [
        str(o / "tiny.gguf"),  # outside every allowed folder
        f"{a}/../outside/tiny.gguf",
        str(a / "link.gguf"),  # a symlink out of the allowed folder
        str(a / "sub" / "tiny.gguf"),  # through a symlinked folder
        str(a / "fifo.gguf"),
        str(o / "fifo.gguf"),
        "/etc/passwd",
        "/dev/zero",
        "/proc/self/environ",
        "file:///etc/passwd",
        "%2Fetc%2Fpasswd",
        "..%2F..%2Fetc%2Fpasswd",
        "../../../../../../etc/passwd",
        "~/.ssh/id_rsa",
        str(home / "victim.txt"),
        "../victim.txt",
        "..\\..\\victim.txt",
        "a/../../victim",
        "%2e%2e/%2e%2e/victim",
    ]


def assert_refused(r: httpx.Response, what: str) -> None:
    assert 400 <= r.status_code < 500, (what, r.status_code, r.text[:300])
    assert "root:" not in r.text and "keep me" not in r.text, (what, r.text[:300])  # nothing read back


def test_pull_cannot_reach_a_path_outside_the_allowed_folders(guarded: Server, layout: dict[str, Path]):
    before = tags(guarded)
    for ref in escapes(layout, guarded.home):
        assert_refused(call(guarded, "POST", "/api/pull", {"model": ref, "stream": False}), ref)
    assert tags(guarded) == before
    ok = call(guarded, "POST", "/api/pull", {"model": str(layout["allowed"] / "ok.gguf"), "stream": False})
    assert ok.status_code == 200, ok.text  # the allowed folder itself works
    assert "ok:latest" in tags(guarded)


def test_show_delete_copy_names_never_leave_the_store(guarded: Server, layout: dict[str, Path]):
    victims = [guarded.home / "victim.txt", layout["outside"] / "victim.txt", layout["outside"] / "tiny.gguf"]
    for ref in escapes(layout, guarded.home):
        assert_refused(call(guarded, "POST", "/api/show", {"model": ref}), f"show {ref}")
        assert_refused(call(guarded, "DELETE", "/api/delete", {"model": ref}), f"delete {ref}")
        r = call(guarded, "POST", "/api/copy", {"source": "tiny", "destination": ref})
        assert_refused(r, f"copy to {ref}")
        r = httpx.get(guarded.url + "/v1/models/" + ref, timeout=10)
        assert r.status_code in (400, 404) and "root:" not in r.text, (ref, r.text[:300])
    assert all(v.exists() for v in victims)
    store = guarded.home / "models"
    strays = [p for p in guarded.home.rglob("*") if not p.is_relative_to(store) and "victim" in p.name]
    assert strays == [guarded.home / "victim.txt"]
    assert {"tiny:latest"} <= tags(guarded)


def test_create_cannot_make_the_server_read_a_local_path(guarded: Server, layout: dict[str, Path]):
    before = tags(guarded)
    for ref in escapes(layout, guarded.home):
        for body in (
            {"model": "made", "from": ref},
            {"model": "made", "modelfile": f"FROM {ref}\nSYSTEM hi"},
            {"model": "made", "from": "tiny", "modelfile": f"FROM {ref}"},
        ):
            assert_refused(call(guarded, "POST", "/api/create", {**body, "stream": False}), f"create {body}")
        assert_refused(
            call(guarded, "POST", "/api/create", {"model": ref, "from": "tiny", "stream": False}), ref
        )
    assert tags(guarded) == before
