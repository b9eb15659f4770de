"""The `tandem serve` process: one event loop serving ZeroMQ clients and HTTP over one engine.

Shutdown (DESIGN.md section 6): the first SIGTERM or SIGINT stops accepting requests and lets
running ones finish (up to ``drain_timeout``), then ends what is left with an error frame; a
second SIGINT forces an immediate stop. The exit code is non-zero when the engine died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from tandem.config import EngineConfig
from tandem.gateway.async_engine import AsyncEngine
from tandem.paths import tandem_home

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 11434
    http: bool = True
    zmq_tcp_port: int | None = None  # also serve the ZeroMQ protocol on tcp://host:PORT
    allowed_hosts: tuple[str, ...] = ()  # extra Host header names accepted besides loopback ones
    local_model_dirs: tuple[Path, ...] = ()  # folders /api/pull may register local files from
    store_timeout: float = 30.0  # seconds a model-store read or delete may take over HTTP
    max_body_bytes: int = 8 * 2**20
    drain_timeout: float = 30.0
    aliases: tuple[str, ...] = field(default_factory=tuple)


def server_info_path() -> Path:
    return tandem_home() / "run" / "server.json"


class Server:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.engine = AsyncEngine(cfg.engine)
        self.frontend = None
        self.http_server = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self.zmq_endpoints: list[str] = []

    def _on_signal(self, signame: str) -> None:
        self._signals += 1
        if self._signals == 1:
            log.warning("%s: draining (again to force)", signame)
            self._stop.set()
        else:
            log.warning("%s again: forcing shutdown", signame)
            self._force.set()
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig.name)
        await self.engine.start()
        try:
            await self._start_frontends()
            self._write_info()
            log.warning(
                "tandem serving %s: http://%s:%d, zmq %s",
                self.cfg.engine.model_name or self.cfg.engine.model_path,
                self.cfg.host,
                self.cfg.port,
                " ".join(self.zmq_endpoints),
            )
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.5)
                if self.engine.dead is not None:
                    log.error("engine died: %s", self.engine.dead)
                    break
        finally:
            await self._shutdown()
        return 1 if self.engine.dead is not None else 0

    async def _start_frontends(self) -> None:
        from tandem.gateway.zmq_frontend import ZmqFrontend

        rt = self.engine.process.runtime_dir
        assert rt is not None
        endpoints = [f"ipc://{rt}/tandem.sock"]
        if self.cfg.zmq_tcp_port is not None:
            endpoints.append(f"tcp://{self.cfg.host}:{self.cfg.zmq_tcp_port}")
        self.frontend = ZmqFrontend(self.engine, endpoints)
        await self.frontend.start()
        self.zmq_endpoints = list(self.frontend.endpoints)
        if self.cfg.http:
            import uvicorn

            from tandem.gateway.http.app import HttpSettings, build_app
            from tandem.models.local_paths import allowed_roots

            settings = HttpSettings(
                allowed_hosts=self.cfg.allowed_hosts,
                local_model_dirs=allowed_roots(self.cfg.local_model_dirs),
                store_timeout=self.cfg.store_timeout,
                max_body_bytes=self.cfg.max_body_bytes,
                aliases=self.cfg.aliases,
                zmq_endpoints=tuple(self.zmq_endpoints),
                bind_host=self.cfg.host,
            )
            app = build_app(self.engine, settings)
            config = uvicorn.Config(
                app,
                host=self.cfg.host,
                port=self.cfg.port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
            self.http_server = uvicorn.Server(config)
            self.http_server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            # uvicorn >= 0.29 captures SIGTERM/SIGINT itself and re-raises them when it stops, so
            # one SIGTERM would reach our handler twice and read as "again: force". Ours alone.
            self.http_server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
            self._http_task = asyncio.create_task(self.http_server.serve(), name="http")
            while not self.http_server.started:
                if self._http_task.done():
                    self._http_task.result()  # raises why it could not start (port in use...)
                    raise RuntimeError(f"HTTP server on {self.cfg.host}:{self.cfg.port} did not start")
                await asyncio.sleep(0.02)

    def _write_info(self) -> None:
        path = server_info_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {
            "pid": os.getpid(),
            "http": f"http://{self.cfg.host}:{self.cfg.port}" if self.cfg.http else None,
            "zmq": self.zmq_endpoints,
            "model": self.cfg.engine.model_name,
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        os.replace(tmp, path)

    def _remove_info(self) -> None:
        path = server_info_path()
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()

    async def _shutdown(self) -> None:
        self._remove_info()
        if self.http_server is not None:
            self.http_server.should_exit = True
        drain = not self._force.is_set() and self.engine.dead is None
        if drain and self.engine.num_active:
            log.warning(
                "waiting up to %.0f s for %d requests", self.cfg.drain_timeout, self.engine.num_active
            )
            drain_task = asyncio.create_task(self.engine.close(drain=True, timeout=self.cfg.drain_timeout))
            force = asyncio.create_task(self._force.wait())
            await asyncio.wait({drain_task, force}, return_when=asyncio.FIRST_COMPLETED)
            force.cancel()
            if not drain_task.done():
                drain_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain_task
        # Whatever is still running ends now with an error frame, before the front ends close,
        # so every stream gets its terminal line (uvicorn waits for open streams to finish).
        await self.engine.close()
        if self.frontend is not None:
            await self.frontend.close()
        if self.http_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 5)


def serve(cfg: ServeConfig) -> int:
    return asyncio.run(Server(cfg).run())
