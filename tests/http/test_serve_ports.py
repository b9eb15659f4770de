"""`tandem serve` and its ports, on real servers: a busy port fails a second server at once, in one
line and before it starts any child process, while the first keeps serving; the ZeroMQ port stays
on loopback whatever --host says; a port open beyond this machine is warned about; frames without
a readable request id are counted in /metrics.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import pytest
import zmq
from live_server import Server, free_port, tiny_home
from procs import descendants

from tandem.client import TandemClient
from tandem.gateway.listen import ServeError, listen_tcp, port_owner
from tandem.messages import RequestError, decode


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    zmq_port = free_port()
    server = Server(tiny_home(tmp_path_factory, tiny_gguf), args=("--zmq-port", str(zmq_port))).start()
    server.zmq_port = zmq_port  # type: ignore[attr-defined]
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


def run_second(first: Server, *args: str) -> tuple[int, str, str, set[int]]:
    """A second `tandem serve` in the first one's TANDEM_HOME: exit code, stdout, stderr, and every
    process it started (watched until it exits)."""
    cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", "tiny", "--kv-cache-memory", "64M", *args]
    proc = subprocess.Popen(cmd, env=first.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children: set[int] = set()
    deadline = time.monotonic() + 120
    while proc.poll() is None:
        children |= descendants(proc.pid)
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the second server neither failed nor stopped")
        time.sleep(0.005)
    out, err = proc.communicate()
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    assert not list(base.glob(f"tandem*-{proc.pid}-*")), "runtime directories (ipc sockets) left behind"
    return proc.returncode, out.decode(), err.decode(), children


def still_serving(first: Server) -> None:
    body = {"model": "tiny", "prompt": "hi", "stream": False, "options": {"num_predict": 2}}
    r = httpx.post(first.url + "/api/generate", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["done"] is True, r.text
    with TandemClient(f"tcp://127.0.0.1:{first.zmq_port}", timeout=20) as c:  # type: ignore[attr-defined]
        assert c.generate("hi", max_tokens=2, ignore_eos=True).finish_reason == "length"


@pytest.mark.parametrize("busy", ["http", "zmq"])
def test_second_server_on_a_busy_port_fails_in_one_line_before_starting_anything(
    first: Server, busy: str
) -> None:
    assert first.proc is not None
    zmq_port: int = first.zmq_port  # type: ignore[attr-defined]
    port = first.port if busy == "http" else zmq_port
    args = ("--port", str(port)) if busy == "http" else ("--port", str(free_port()), "--zmq-port", str(port))
    code, out, err, children = run_second(first, *args)
    assert code != 0
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert f"port {port} is in use by pid {first.proc.pid} (tandem serve)" in err, err
    assert children == set(), "a child process was started before the port was checked"
    record = json.loads((first.home / "run" / "server.json").read_text())
    assert record["pid"] == first.proc.pid  # the first server's record is left alone
    still_serving(first)


def test_frames_without_a_readable_request_id_are_counted_in_metrics(first: Server) -> None:
    def counted() -> float:
        text = httpx.get(first.url + "/metrics", timeout=10).text
        line = next(ln for ln in text.splitlines() if ln.startswith("tandem_zmq_undecodable_frames_total "))
        return float(line.split()[1])

    before = counted()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{first.zmq_port}")  # type: ignore[attr-defined]
    try:
        for junk in (b"\xc1", msgpack.packb([53, 42, "hi"]), msgpack.packb([53, "r", "x" * 3]) + b"\xff"):
            sock.send(junk)
            assert sock.poll(5000)
            err = decode(sock.recv())
            assert isinstance(err, RequestError) and err.request_id == "", err
    finally:
        sock.close()
        ctx.term()
    assert counted() == before + 3


def _listening(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (IPv4 dotted, IPv6 as hex)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            addr, port_hex = cols[1].rsplit(":", 1)
            if cols[3] == "0A" and int(port_hex, 16) == port:
                found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr)
    return found


@pytest.mark.parametrize("exposed", ["http", "zmq"])
def test_zmq_stays_on_loopback_unless_told_and_public_ports_are_warned_about(
    tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path, exposed: str
) -> None:
    zmq_port = free_port()
    public = ("--host", "0.0.0.0") if exposed == "http" else ("--zmq-host", "0.0.0.0")
    home = tiny_home(tmp_path_factory, tiny_gguf)
    server = Server(home, args=(*public, "--zmq-port", str(zmq_port))).start()
    try:
        zmq_addr = "0.0.0.0" if exposed == "zmq" else "127.0.0.1"
        assert _listening(zmq_port) == {zmq_addr}
        assert _listening(server.port) == {"0.0.0.0" if exposed == "http" else "127.0.0.1"}
        record = json.loads((server.home / "run" / "server.json").read_text())
        assert f"tcp://{zmq_addr}:{zmq_port}" in record["zmq"]
        warnings = [ln for ln in server.log.read_text().splitlines() if "unauthenticated" in ln]
        assert len(warnings) == 1, server.log.read_text()
        what = "HTTP" if exposed == "http" else "ZeroMQ"
        assert warnings[0].startswith("WARNING") and f" {what} on " in warnings[0], warnings
        with TandemClient(f"tcp://127.0.0.1:{zmq_port}", timeout=20) as c:
            assert c.generate("hi", max_tokens=2, ignore_eos=True).finish_reason == "length"
    finally:
        assert server.stop() == 0, server.log.read_text()[-3000:]


def test_a_busy_port_names_the_process_listening_on_it() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert (port_owner(port) or "").startswith(f"pid {os.getpid()} (")
        with pytest.raises(ServeError) as e:
            listen_tcp("127.0.0.1", port, "HTTP")
        message = str(e.value)
        assert "\n" not in message and f"port {port} is in use by pid {os.getpid()}" in message
    assert port_owner(port) is None
    listen_tcp("127.0.0.1", port, "HTTP").close()  # free again
