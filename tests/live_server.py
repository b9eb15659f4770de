"""A real `tandem serve` subprocess on a free loopback port, and /proc helpers to check on it.

Each server gets its own TANDEM_HOME (its models, its run/server.json), so servers and the
commands that find them (`tandem run`, `ps`, `stop`) never see each other. Teardown stops the
server with SIGTERM and asserts that it and every process it started have exited.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from procs import descendants, running

from tandem.stress.server import home_env

TINY_CONTEXT = 4096
LONG = {"num_predict": 3000, "ignore_eos": True}  # a generation that runs for seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register(home: Path, path: Path, name: str) -> None:
    from tandem.store.model_store import pull_model

    with home_env(home):
        pull_model(str(path), progress=False, name=name)


class Server:
    def __init__(self, home: Path, model: str | None = "tiny", args: tuple[str, ...] = ()) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # OLLAMA_MODELS: its own (empty) ollama store, never the machine's.
        self.env = {
            **os.environ,
            "TANDEM_HOME": str(home),
            "OLLAMA_MODELS": str(home / "ollama"),
            "PYTHONUNBUFFERED": "1",
        }
        self.log = home / "serve.log"
        cmd = [
            sys.executable,
            "-m",
            "tandem.cli",
            "serve",
            "--port",
            str(self.port),
            "--kv-cache-memory",
            "64M",
        ]
        # float32 unless a test says otherwise: tests compare outputs across batchings token for
        # token, which bf16 compute does not guarantee.
        if "--dtype" not in args:
            cmd += ["--dtype", "float32"]
        cmd += ["--model", model] if model else []
        self.cmd = cmd + list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: set[int] = set()

    def start(self, timeout: float = 120.0) -> Server:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tandem serve exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    self.children = descendants(self.proc.pid)
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tandem serve did not answer within {timeout} s:\n{self.log.read_text()}")

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)  # type: ignore[arg-type]

    def ps(self) -> dict:
        return httpx.get(self.url + "/api/ps", timeout=10).json()["models"][0]["tandem"]

    def worker_pid(self) -> int:
        return int(self.ps()["memory_plan"]["worker_pid"])

    def stop(self) -> int | None:
        """SIGTERM, wait, and check nothing is left running; returns the exit code."""
        if self.proc is None:
            return None
        self.children |= descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                pytest.fail(f"tandem serve ignored SIGTERM for 30 s:\n{self.log.read_text()[-3000:]}")
        deadline = time.monotonic() + 10
        while any(running(p) for p in self.children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in self.children if running(p)]
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        assert not left, f"processes left behind by tandem serve: {left}"
        return self.proc.returncode


def add_ollama_model(root: Path, model: str, gguf: bytes) -> Path:
    """Lay out `model` (library/model:latest) the way `ollama pull` does: a manifest and a blob."""
    digest = hashlib.sha256(gguf).hexdigest()
    blob = root / "blobs" / f"sha256-{digest}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(gguf)
    media = "application/vnd.ollama.image.model"
    layer = {"mediaType": media, "digest": f"sha256:{digest}", "size": len(gguf)}
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / model / "latest"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [layer]}))
    return blob


def tiny_home(factory: pytest.TempPathFactory, gguf: Path) -> Path:
    home = factory.mktemp("home")
    register(home, gguf, "tiny")
    return home


def wait_for(predicate: Callable[[], object], timeout: float = 5.0, step: float = 0.02) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


def raw_post(server: Server, path: str, body: dict, rcvbuf: int | None = None) -> socket.socket:
    """Send a POST over a bare socket and leave its answer unread: a client that waits, is about to
    leave, or (with a small ``rcvbuf``, set before connecting so it sizes the TCP window) has
    stopped reading."""
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", server.port))
    data = json.dumps(body).encode()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s
