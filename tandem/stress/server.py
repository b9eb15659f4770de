"""A `tandem serve` subprocess for a scenario: tiny random models in a temporary TANDEM_HOME,
HTTP and ZeroMQ on free loopback ports, stopped (with everything it started) on exit."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tandem.bench.server_process import ServerProcess, free_port
from tandem.stress.procstat import ProcStat, process_tree, shm_segments, tree_stats

log = logging.getLogger(__name__)

TINY_CONTEXT = 4096


@contextlib.contextmanager
def home_env(home: Path) -> Iterator[None]:
    """TANDEM_HOME set to ``home`` for the block (the store and run files of a server of its own)."""
    old = os.environ.get("TANDEM_HOME")
    os.environ["TANDEM_HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TANDEM_HOME", None)
        else:
            os.environ["TANDEM_HOME"] = old


def write_models(home: Path, names: tuple[str, ...]) -> None:
    """One tiny llama per name, each from its own seed (the store would share one blob otherwise)."""
    from tandem.formats.tiny import TinySpec, write_tiny_gguf
    from tandem.store.model_store import pull_model

    files = home / "files"
    files.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        path = write_tiny_gguf(files / f"{name}.gguf", TinySpec(context=TINY_CONTEXT, seed=seed + 1))
        with home_env(home):
            pull_model(str(path), progress=False, name=name)


@dataclass
class StressServer:
    """``models[0]`` is the one `serve --model` loads (and ZeroMQ serves); others load on demand."""

    home: Path
    http_url: str
    zmq_url: str
    process: ServerProcess

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def alive(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def log_text(self) -> str:
        return self.process.log_tail(10**9)

    def ps(self, model: str = "tiny") -> dict[str, Any]:
        models = httpx.get(self.http_url + "/api/ps", timeout=10, trust_env=False).json()["models"]
        for m in models:
            if m["name"].split(":")[0] == model:
                return m["tandem"]
        raise KeyError(f"{model} is not loaded: {[m['name'] for m in models]}")

    def loaded(self) -> list[str]:
        models = httpx.get(self.http_url + "/api/ps", timeout=10, trust_env=False).json()["models"]
        return [m["name"].split(":")[0] for m in models]

    def stats(self) -> dict[str, ProcStat]:
        """The server's processes by role: "gateway", "MODEL scheduler", "MODEL worker" (each
        model's scheduler starts its worker)."""
        models = httpx.get(self.http_url + "/api/ps", timeout=10, trust_env=False).json()["models"]
        workers = {int(m["tandem"]["memory_plan"]["worker_pid"]): m["name"].split(":")[0] for m in models}
        schedulers = {_parent(pid): name for pid, name in workers.items()}
        out: dict[str, ProcStat] = {}
        for pid, st in tree_stats(self.pid).items():
            if pid == self.pid:
                out["gateway"] = st
            elif pid in workers:
                out[f"{workers[pid]} worker"] = st
            elif pid in schedulers:
                out[f"{schedulers[pid]} scheduler"] = st
            else:
                out[f"pid {pid}"] = st
        return out

    def metric(self, name: str, model: str = "tiny") -> float:
        """One series of /metrics: ``name`` (with its ``_total`` for a counter) for ``model``."""
        text = httpx.get(self.http_url + "/metrics", timeout=10, trust_env=False).text
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] == name and f'model="{model}' in series:
                return float(value)
        raise KeyError(f"/metrics has no {name} for {model}")

    def shm(self) -> set[str]:
        return shm_segments(process_tree(self.pid))


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@contextlib.contextmanager
def stress_server(
    models: tuple[str, ...] = ("tiny",), args: tuple[str, ...] = (), kv_cache: str = "64M"
) -> Iterator[StressServer]:
    with tempfile.TemporaryDirectory(prefix="tandem-stress-") as tmp:
        home = Path(tmp)
        write_models(home, models)
        xdg = home / "xdg"  # its ipc socket directories, apart from other servers'
        xdg.mkdir(mode=0o700)
        port, zmq_port = free_port(), free_port()
        env = {
            **os.environ,
            "TANDEM_HOME": str(home),
            "OLLAMA_MODELS": str(home / "ollama"),  # an empty ollama store, never the machine's
            "XDG_RUNTIME_DIR": str(xdg),
            "PYTHONUNBUFFERED": "1",
        }
        # float32: greedy outputs are compared across batchings token for token, which bf16 does
        # not guarantee.
        cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", models[0], "--port", str(port)]
        cmd += ["--zmq-port", str(zmq_port), "--dtype", "float32", "--kv-cache-memory", kv_cache, *args]
        proc = ServerProcess("tandem serve", cmd, home / "serve.log", env).start()
        server = StressServer(home, f"http://127.0.0.1:{port}", f"tcp://127.0.0.1:{zmq_port}", proc)
        try:
            proc.wait_ready(server.http_url + "/", 180)
            yield server
        except BaseException:
            _keep_log(home / "serve.log")
            raise
        finally:
            proc.stop()


def keep_log_text(text: str, scenario: str) -> Path | None:
    """A failed scenario's server log (read before its home went away), kept where `_keep_log`
    keeps them; None if it could not be written."""
    kept = Path(tempfile.gettempdir()) / f"tandem-stress-{scenario}-{os.getpid()}-{time.time_ns()}.log"
    try:
        kept.write_text(text)
    except OSError:
        return None
    return kept


def _keep_log(log_file: Path) -> None:
    """A failed scenario's server log outlives its temporary home, for the one who reads the failure."""
    kept = (
        Path(tempfile.gettempdir()) / f"tandem-stress-serve-{os.getpid()}-{log_file.stat().st_mtime_ns}.log"
    )
    with contextlib.suppress(OSError):
        kept.write_bytes(log_file.read_bytes())
        log.warning("the server's log is kept in %s", kept)
