"""A server subprocess of the race (tandem serve, llama-server): start it, wait until it answers,
stop it, and leave nothing running.

Each server runs in a session of its own, so a server that ignores SIGTERM is killed with its
whole process group (its children included) and never outlives the bench; one that stops on
SIGTERM stops its own children (tandem serve does, and is tested for it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tandem.bench.samples import BenchError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        log.info("starting %s: %s", self.name, " ".join(self.cmd))
        with open(self.log_path, "wb") as out:
            try:
                self.proc = subprocess.Popen(
                    self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
                )
            except OSError as e:
                raise BenchError(f"cannot start {self.name} ({self.cmd[0]}): {e}") from None
        return self

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def wait_ready(self, url: str, timeout_s: float) -> None:
        """Until GET url answers 200; BenchError (with the server's last log lines) if it exits or
        takes longer than timeout_s."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"{self.name} exited with status {self.proc.returncode} before it answered:\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url).status_code == 200:
                        return
                time.sleep(0.2)
        raise BenchError(f"{self.name} did not answer {url} within {timeout_s:g} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        p = self.proc
        if p is None:
            return
        self.proc = None
        if p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM for %g s; killing its process group", self.name, timeout_s)
            # The leader is alive and not reaped, so the group id is still this server's own.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
