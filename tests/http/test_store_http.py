"""The model store over HTTP, against a real `tandem serve`: what /api/pull may register, names in
/api/show and /api/delete that try to leave the store, broken and hostile files, and store work
that blocks (a held model lock) without ever starving the server or stopping SIGTERM.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live_server import Server, tiny_home

from tandem.stress.server import home_env

STORE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    """A folder next to the allowed one, with a valid model that must stay out of reach."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "model.gguf").write_bytes(tiny_gguf.read_bytes())
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, allowed: Path) -> Iterator[Server]:
    args = ("--allow-local-models", str(allowed), "--store-timeout", str(STORE_TIMEOUT))
    s = Server(tiny_home(tmp_path_factory, tiny_gguf), args=args).start()
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def pull(server: Server, model: str, stream: bool = False, timeout: float = 15) -> httpx.Response:
    return httpx.post(server.url + "/api/pull", json={"model": model, "stream": stream}, timeout=timeout)


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert isinstance(message, str) and "\n" not in message
    return message


def stream_error(server: Server, model: str) -> str:
    r = pull(server, model, stream=True)
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"} and "error" in lines[-1], lines
    return lines[-1]["error"]


def names(server: Server) -> set[str]:
    return {m["name"] for m in httpx.get(server.url + "/api/tags", timeout=15).json()["models"]}


# --- what a pull may name --------------------------------------------------------------------------


def test_local_paths_are_refused_by_default(tiny_server: Server, tiny_gguf: Path) -> None:
    before = names(tiny_server)
    for ref in (str(tiny_gguf), "/etc/passwd", "/proc/self/fd/0", "./x.gguf", "~/x.gguf", "../x.gguf"):
        message = error_of(pull(tiny_server, ref), 403)
        assert "--allow-local-models" in message and "hf://" in message, message
        assert "--allow-local-models" in stream_error(tiny_server, ref)
    assert names(tiny_server) == before


def test_a_file_in_an_allowed_folder_is_pulled_shown_without_its_path_and_deleted(
    server: Server, allowed: Path, tiny_gguf: Path
) -> None:
    path = allowed / "mine.gguf"
    path.write_bytes(tiny_gguf.read_bytes())

    assert pull(server, str(path)).json() == {"status": "success"}
    assert "mine:latest" in names(server)
    show = httpx.post(server.url + "/api/show", json={"model": "mine"}, timeout=15).json()
    assert str(allowed) not in json.dumps(show) and "FROM mine:latest" in show["modelfile"]
    assert httpx.request("DELETE", server.url + "/api/delete", json={"model": "mine"}).status_code == 200
    assert "mine:latest" not in names(server) and path.exists()


def test_paths_that_leave_the_allowed_folder_are_refused(
    server: Server, allowed: Path, outside: Path
) -> None:
    link = allowed / "link.gguf"
    link.symlink_to(outside / "model.gguf")
    (allowed / "sub").mkdir()
    (allowed / "sub" / "inside.gguf").write_bytes((outside / "model.gguf").read_bytes())
    hf = allowed / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (hf / name).write_text("{}")
    (hf / "model.safetensors").symlink_to(outside / "model.gguf")
    before = names(server)
    refused = {
        str(outside / "model.gguf"): "not inside a folder this server allows",
        str(link): "not inside a folder this server allows",
        f"{allowed}/sub/../sub/inside.gguf": "'..' is not allowed",
        f"{allowed}/../{outside.name}/model.gguf": "'..' is not allowed",
        f"{allowed}-evil/model.gguf": "not inside a folder this server allows",
        "sub/inside.gguf": "give an absolute path",
        str(hf): "model.safetensors links outside",
    }
    for ref, fragment in refused.items():
        assert fragment in error_of(pull(server, ref), 403), ref
    assert names(server) == before


def test_broken_and_foreign_files_are_one_line_errors_that_never_quote_them(
    server: Server, allowed: Path, tiny_gguf: Path
) -> None:
    secret = allowed / "secret.gguf"
    secret.write_bytes(b"hunter2 is the root password\n")
    truncated = allowed / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:-1000])

    for message in (error_of(pull(server, str(secret)), 400), stream_error(server, str(secret))):
        assert "not a GGUF file" in message and "hunt" not in message
    message = error_of(pull(server, str(truncated)), 400)
    assert "extends past the end of the file" in message and "truncated" in message
    assert not {"secret:latest", "truncated:latest"} & names(server)


def test_fifos_and_proc_entries_never_block_the_server(server: Server, allowed: Path) -> None:
    fifo = allowed / "fifo.gguf"
    os.mkfifo(fifo)
    (allowed / "proc.gguf").symlink_to("/proc/self/fd/0")
    started = time.monotonic()
    with ThreadPoolExecutor(24) as pool:  # more pulls than asyncio's default pool has threads
        fifo_answers = list(pool.map(lambda _: pull(server, str(fifo)), range(16)))
        proc_answers = list(pool.map(lambda _: pull(server, str(allowed / "proc.gguf")), range(8)))
    assert time.monotonic() - started < 10
    assert all("is a FIFO, not a regular file" in error_of(r, 400) for r in fifo_answers)
    assert all(error_of(r, 403) for r in proc_answers)  # its target lies outside the folder
    assert_server_responsive(server)


def assert_server_responsive(server: Server) -> None:
    """Store reads, chat-template rendering and off-thread tokenization (a prompt over 4096
    characters), each answered within seconds."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/api/tags").status_code == 200
        assert c.post("/api/show", json={"model": "tiny"}).status_code == 200
        body = {"model": "tiny", "prompt": " the" * 1200, "stream": False, "options": {"num_predict": 1}}
        assert c.post("/api/generate", json=body).status_code == 200


# --- names that try to leave the store --------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "a/../../b", "..", "x/../../../y:z"])
def test_show_and_delete_names_are_store_names(server: Server, name: str) -> None:
    assert 400 <= httpx.post(server.url + "/api/show", json={"model": name}).status_code < 500
    r = httpx.request("DELETE", server.url + "/api/delete", json={"model": name})
    assert 400 <= r.status_code < 500, r.text


def test_links_out_of_the_store_are_never_followed(server: Server, tmp_path: Path, tiny_gguf: Path) -> None:
    store = server.home / "models"
    # A manifest that is a link to one outside the store: never read, never listed.
    foreign = tmp_path / "foreign.json"
    body = {
        "schema": 1, "name": "evil:latest", "format": "gguf", "path": str(tiny_gguf), "owned": False,
        "size": tiny_gguf.stat().st_size, "source": "file:x", "pulled_at": "2025-01-01T00:00:00+00:00",
    }  # fmt: skip
    foreign.write_text(json.dumps(body))
    (store / "manifests" / "evil@latest.json").symlink_to(foreign)
    # A namespace folder that is a link out of the store: deleting a model in it must not follow it.
    victim = tmp_path / "victim"
    (victim / "m@latest").mkdir(parents=True)
    (victim / "m@latest" / "keep.gguf").write_bytes(b"GGUF precious")
    (store / "data" / "ns").parent.mkdir(parents=True, exist_ok=True)
    (store / "data" / "ns").symlink_to(victim)
    (store / "manifests" / "ns").mkdir()
    owned = {**body, "name": "ns/m:latest", "path": "data/ns/m@latest/keep.gguf", "owned": True}
    (store / "manifests" / "ns" / "m@latest.json").write_text(json.dumps(owned))

    assert "evil:latest" not in names(server)
    r = httpx.post(server.url + "/api/show", json={"model": "evil"}, timeout=15)
    assert 400 <= r.status_code < 500 and str(tiny_gguf) not in r.text
    httpx.request("DELETE", server.url + "/api/delete", json={"model": "ns/m"}, timeout=15)
    assert (victim / "m@latest" / "keep.gguf").read_bytes() == b"GGUF precious"


# --- store work that blocks -------------------------------------------------------------------------


@contextlib.contextmanager
def holding_model_lock(home: Path, name: str) -> Iterator[None]:
    """Hold a model's store lock from this process, as a `tandem pull` of it in progress does."""
    from tandem.store.registry import lock_path

    with home_env(home):
        path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def test_blocked_store_work_times_out_and_starves_nothing(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, allowed: Path
) -> None:
    home = tiny_home(tmp_path_factory, tiny_gguf)
    (allowed / "other.gguf").write_bytes(tiny_gguf.read_bytes())
    args = ("--allow-local-models", str(allowed), "--store-timeout", str(STORE_TIMEOUT))
    server = Server(home, args=args).start()
    try:
        assert pull(server, str(allowed / "other.gguf")).status_code == 200
        with holding_model_lock(home, "other:latest"):
            delete = {"model": "other"}
            started = time.monotonic()
            with ThreadPoolExecutor(12) as pool:  # twice asyncio's default pool on this machine
                futures = [
                    pool.submit(httpx.request, "DELETE", server.url + "/api/delete", json=delete, timeout=30)
                    for _ in range(12)
                ]
                time.sleep(0.5)
                assert_server_responsive(server)  # while every delete waits on the lock
                answers = [f.result() for f in futures]
            assert time.monotonic() - started < 4 * STORE_TIMEOUT + 5
            for r in answers:
                message = error_of(r, 504)
                assert f"deleting 'other' did not finish within {STORE_TIMEOUT:g} s" in message
            # SIGTERM while two store threads are still stuck on the lock: the server exits anyway.
            stopped = threading.Event()
            threading.Thread(target=lambda: (server.stop(), stopped.set()), daemon=True).start()
            assert stopped.wait(40), "tandem serve did not exit on SIGTERM"
            assert server.proc is not None and server.proc.returncode == 0, server.log.read_text()[-3000:]
    finally:
        server.stop()
