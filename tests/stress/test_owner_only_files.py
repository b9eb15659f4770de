"""What a live `tandem serve` leaves on the file system for other local users to find: its ipc
socket files, its shared-memory ring in /dev/shm and its run/server.json must be the owner's alone,
even under a umask of 000 (the server sets the modes itself rather than trusting the umask).

Run: python -m pytest tests/stress/test_owner_only_files.py -q
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from live_server import Server, register
from procs import descendants

from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.shm import list_segments
from tandem.shm.segment import SHM_DIR


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_sockets_ring_and_server_record_are_owner_only(tmp_path: Path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(context=256))
    home = tmp_path / "home"
    register(home, model, "tiny")
    runtime = Path(tempfile.mkdtemp(prefix="xdg-"))  # short: a socket path has at most 107 bytes
    server = Server(home, args=("--zmq-port", "0", "--kv-cache-memory", "16M"))
    server.env["XDG_RUNTIME_DIR"] = str(runtime)
    old = os.umask(0)  # the child inherits it: nothing may come out world-writable
    try:
        server.start()
    finally:
        os.umask(old)
    try:
        pids = {server.proc.pid} | descendants(server.proc.pid)
        dirs = [p for p in runtime.iterdir() if p.is_dir()]
        assert {d.name.split("-")[1] for d in dirs} >= {"zmq"}, dirs  # the client's and the engine's
        sockets = [p for d in dirs for p in d.iterdir()]
        assert sockets and all(stat.S_ISSOCK(p.lstat().st_mode) for p in sockets), sockets
        for d in dirs:
            assert mode(d) == 0o700 and d.stat().st_uid == os.getuid(), (d, oct(mode(d)))
        client = [p for p in sockets if p.name.startswith("client-")]
        assert len(client) == 1 and mode(client[0]) == 0o600, [(p, oct(mode(p))) for p in client]

        segments = [Path(SHM_DIR) / s for p in pids for s in list_segments(pid=p)]
        assert segments, "the ring's shared-memory segment should exist"
        for seg in segments:
            assert mode(seg) == 0o600 and seg.stat().st_uid == os.getuid(), (seg, oct(mode(seg)))

        record = home / "run" / "server.json"
        assert mode(record) == 0o600 and mode(record.parent) == 0o700, (
            oct(mode(record)),
            oct(mode(record.parent)),
        )
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]
    assert not any(runtime.iterdir()), list(runtime.iterdir())  # and all of it is gone after
    runtime.rmdir()


def test_a_runtime_dir_too_long_for_a_socket_path_is_one_line(tmp_path: Path):
    runtime = tmp_path / ("x" * 90)
    runtime.mkdir(mode=0o700)
    model = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(context=256))
    env = {**os.environ, "TANDEM_HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(runtime)}
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", str(model), "--port", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("Error: cannot serve the ZeroMQ protocol: ipc path too long"), proc.stderr


@pytest.mark.parametrize("umask", [0o002, 0o000])
def test_an_explicit_ipc_path_is_owner_only_too(tmp_path: Path, umask: int):
    """An ipc path the caller names lies outside the 0700 runtime dir: the file itself must be 0600."""
    import asyncio

    from tandem.gateway.zmq_frontend import ZmqFrontend

    path = tmp_path / "open-dir" / "zmq.sock"
    path.parent.mkdir(mode=0o777)

    async def bind_only() -> None:
        fe = ZmqFrontend(None, [f"ipc://{path}"])  # type: ignore[arg-type]  # binding needs no engine
        old = os.umask(umask)
        try:
            fe.bind()
        finally:
            os.umask(old)
        try:
            assert mode(path) == 0o600, oct(mode(path))
        finally:
            await fe.close()

    asyncio.run(bind_only())
    assert not path.exists()
