"""The `tandem serve` process: one event loop serving ZeroMQ clients and HTTP over one engine.

Shutdown: the first SIGTERM or SIGINT stops accepting requests and lets
running ones finish (up to ``drain_timeout``), then ends what is left with an error frame; a
second SIGINT forces an immediate stop. The exit code is non-zero when the engine died.

Startup claims the HTTP and ZeroMQ ports first: a busy port is a one-line ServeError before the
scheduler and worker are spawned or any model is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq

from tandem.actors import ActorStartError
from tandem.config import EngineConfig
from tandem.engine.aio import AsyncEngine
from tandem.gateway.http.model_pool import ModelPool, startup_shortfall
from tandem.gateway.http.state import Gateway, HttpSettings
from tandem.gateway.listen import ServeError, bind_error, is_loopback, listen_tcp
from tandem.gateway.zmq_frontend import ZmqFrontend
from tandem.paths import tandem_home

log = logging.getLogger(__name__)

IDLE_CONNECTION_S = 75  # as nginx's keepalive_timeout

DEAD_ENGINE_GRACE_S = 1.0  # how long the front ends keep answering after the engine died
HTTP_SEND_BUFFER = 64 * 2**10  # bytes; the kernel doubles it for its bookkeeping


@dataclass
class ServeConfig:
    engine: EngineConfig
    # What the HTTP routes read (their special_in_messages applies to the ZeroMQ front end too);
    # its zmq_endpoints and bind_host are filled in here once the ports are bound.
    http_settings: HttpSettings = field(default_factory=HttpSettings)
    host: str = "127.0.0.1"
    port: int = 11434
    http: bool = True
    zmq_tcp_port: int | None = None  # also serve the ZeroMQ protocol on tcp://zmq_host:PORT
    zmq_host: str = "127.0.0.1"  # not `host`: the ZeroMQ protocol has no authentication at all
    drain_timeout: float = 30.0


def server_info_path() -> Path:
    return tandem_home() / "run" / "server.json"


class Server:
    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.engine = AsyncEngine(cfg.engine)
        self.frontend: ZmqFrontend | None = None
        self.http_server = None
        self._http_sock: socket.socket | None = None
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._signals = 0
        self.zmq_endpoints: list[str] = []
        self.pool: ModelPool | None = None  # the models loaded on demand (HTTP only)
        self.failure: str | None = None  # why an engine died, which ends the server
        self._gateway: Gateway | None = None  # the HTTP app's (its draining flag)
        self._run_lock: int | None = None  # fd holding run/serve.lock

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
        try:
            self._listen()
            self._claim_run_dir()
            short = startup_shortfall(self.cfg.engine, self.cfg.http_settings.memory_limit)
            if short is not None:
                raise ServeError(f"cannot load {short}")
            try:
                await self.engine.start()
            except ActorStartError as e:
                # The innermost reason (the worker's, through the scheduler's): one line.
                reason = e.reason.rpartition("failed to start: ")[2]
                name = self.cfg.engine.model_name or self.cfg.engine.model_path
                raise ServeError(f"cannot load model '{name}': {reason}") from None
            await self._start_frontends()
            self._write_info()
            log.warning(
                "tandem serving %s: %s, zmq %s",
                self.cfg.engine.model_name or self.cfg.engine.model_path,
                self._http_url() or "no HTTP",
                " ".join(self.zmq_endpoints),
            )
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.5)
                self.failure = self._engine_failure()
                if self.failure is not None:
                    log.error("engine died: %s", self.failure)
                    # Requests that arrive meanwhile get the engine's error (503) instead of a
                    # connection closed under them, then the server exits non-zero.
                    await asyncio.sleep(DEAD_ENGINE_GRACE_S)
                    break
        finally:
            await self._shutdown()
        return 1 if self.failure is not None else 0

    def _engine_failure(self) -> str | None:
        """Why an engine stopped working: the --model one's, or one loaded on demand (its
        scheduler gave up, say after 3 worker deaths in a minute); None while all work."""
        dead = [(self.cfg.engine.model_name, self.engine.dead)]
        if self.pool is not None:
            dead += [(m.name, m.gw.engine.dead) for m in self.pool.entries()] + [self.pool.failed]
        for name, why in (d for d in dead if d is not None and d[1] is not None):
            return why if f"'{name}'" in why else f"model '{name}': {why}"
        return None

    def _listen(self) -> None:
        """Bind every port now; ServeError (one line, nothing started) when one cannot be had."""
        cfg = self.cfg
        if cfg.http and cfg.zmq_tcp_port is not None and cfg.zmq_tcp_port == cfg.port != 0:
            raise ServeError(f"--zmq-port {cfg.port} is the HTTP port too; choose another")
        if cfg.http:
            self._http_sock = listen_tcp(cfg.host, cfg.port, "HTTP")
            # Accepted connections inherit this. A fixed send buffer keeps the kernel from growing
            # it to megabytes for a client that stopped reading (autotuning does, on loopback),
            # so such a client's writes block, and --send-timeout cancels its request, within
            # seconds rather than after minutes of generating into the buffer.
            self._http_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HTTP_SEND_BUFFER)
            cfg.port = self._http_sock.getsockname()[1]  # the one picked, for port 0
        endpoints = ["ipc://"]  # a fresh 0700 directory of its own
        if cfg.zmq_tcp_port is not None:
            endpoints.append(f"tcp://{_url_host(cfg.zmq_host)}:{cfg.zmq_tcp_port}")
        self.frontend = ZmqFrontend(
            self.engine,
            endpoints,
            special_in_messages=cfg.http_settings.special_in_messages,
            send_timeout=cfg.http_settings.send_timeout,
        )
        try:
            self.frontend.bind()
        except zmq.ZMQError as e:
            raise bind_error("ZeroMQ", cfg.zmq_host, cfg.zmq_tcp_port or 0, e) from None
        except ValueError as e:  # the runtime dir ($XDG_RUNTIME_DIR) is too long for a socket path
            raise ServeError(f"cannot serve the ZeroMQ protocol: {e}") from None
        self.zmq_endpoints = list(self.frontend.endpoints)
        self._warn_if_exposed()

    def _claim_run_dir(self) -> None:
        """Hold the runtime directory's lock for this server's lifetime: a second serve with the
        same TANDEM_HOME (another port) would overwrite the record `run`, `ps` and `stop` find
        it by. The kernel drops the lock when this process dies, however it dies."""
        run_dir = server_info_path().parent
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        run_dir.chmod(0o700)  # owner-only whatever made it: the record names a pid `stop` signals
        fd = os.open(run_dir / "serve.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServeError(
                f"another tandem serve{_recorded_owner()} is running with the runtime directory "
                f"{run_dir}: stop it (tandem stop) or give this one its own TANDEM_HOME"
            ) from None
        self._run_lock = fd

    def _warn_if_exposed(self) -> None:
        cfg = self.cfg
        if cfg.http and not is_loopback(cfg.host):
            log.warning(
                "HTTP on %s can be reached from other machines, and the API is unauthenticated: anyone "
                "who reaches it can use the model (bind to 127.0.0.1 unless that is what you want)",
                self._http_url(),
            )
        tcp = [ep for ep in self.zmq_endpoints if ep.startswith("tcp://")]
        if tcp and not is_loopback(cfg.zmq_host):
            log.warning(
                "ZeroMQ on %s can be reached from other machines, and the protocol is unauthenticated "
                "and unencrypted: anyone who reaches it can use the model",
                tcp[0],
            )

    def _http_url(self) -> str | None:
        return f"http://{_url_host(self.cfg.host)}:{self.cfg.port}" if self.cfg.http else None

    async def _start_frontends(self) -> None:
        assert self.frontend is not None
        await self.frontend.start()
        if self.cfg.http:
            import uvicorn

            from tandem.gateway.http.app import build_app

            settings = replace(
                self.cfg.http_settings, zmq_endpoints=tuple(self.zmq_endpoints), bind_host=self.cfg.host
            )
            app = build_app(self.engine, settings)
            self._gateway = app.state.gateway
            self.pool = self._gateway.pool
            undecodable = app.state.gateway.metrics.zmq_undecodable_frames
            undecodable.inc(self.frontend.undecodable_frames)
            self.frontend.on_undecodable = undecodable.inc
            config = uvicorn.Config(
                app,
                host=self.cfg.host,
                port=self.cfg.port,
                log_level="warning",
                lifespan="off",
                access_log=False,
                # uvicorn closes an idle keep-alive connection after 5 s by default, the very
                # expiry of httpx's pool: a client reusing one at that moment saw a reset (found
                # by the soak). Held longer than common clients keep them, the close never races.
                timeout_keep_alive=IDLE_CONNECTION_S,
            )
            self.http_server = uvicorn.Server(config)
            self.http_server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
            # uvicorn >= 0.29 captures SIGTERM/SIGINT itself and re-raises them when it stops, so
            # one SIGTERM would reach our handler twice and read as "again: force". Ours alone.
            self.http_server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
            serving = self.http_server.serve(sockets=[self._http_sock] if self._http_sock else None)
            self._http_task = asyncio.create_task(serving, name="http")
            while not self.http_server.started:
                if self._http_task.done():
                    self._http_task.result()  # raises why it could not start
                    raise RuntimeError(f"HTTP server on {self.cfg.host}:{self.cfg.port} did not start")
                await asyncio.sleep(0.02)

    def _write_info(self) -> None:
        path = server_info_path()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = {
            "pid": os.getpid(),
            "http": self._http_url(),
            "zmq": self.zmq_endpoints,
            "model": self.cfg.engine.model_name,
        }
        tmp = path.with_suffix(".tmp")
        # Owner-only: `tandem stop` signals the pid written here, `tandem run` connects where it says.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
        os.chmod(tmp, 0o600)  # O_CREAT's mode only applies to a new file
        os.replace(tmp, path)

    def _remove_info(self) -> None:
        path = server_info_path()
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, OSError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()

    async def _shutdown(self) -> None:
        self._remove_info()
        # HTTP keeps listening while running requests drain, so a new request gets a 503 naming
        # the shutdown instead of a refused connection; uvicorn stops after the drain.
        if self._gateway is not None:
            self._gateway.draining = True
        elif self.http_server is not None:
            self.http_server.should_exit = True
        drain = not self._force.is_set() and self.engine.dead is None
        others = [m.gw.engine for m in self.pool.entries() if not m.resident] if self.pool else []
        active = sum(e.num_active for e in [self.engine, *others])
        if drain and active:
            log.warning("waiting up to %.0f s for %d requests", self.cfg.drain_timeout, active)
            drain_task = asyncio.create_task(self._drain_all())
            force = asyncio.create_task(self._force.wait())
            await asyncio.wait({drain_task, force}, return_when=asyncio.FIRST_COMPLETED)
            force.cancel()
            if not drain_task.done():
                drain_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain_task
        if self.http_server is not None:
            self.http_server.should_exit = True
        # Whatever is still running ends now with an error frame, before the front ends close,
        # so every stream gets its terminal line (uvicorn waits for open streams to finish).
        if self.pool is not None:
            await self.pool.close()
        await self.engine.close()
        if self.frontend is not None:
            await self.frontend.close()
        if self.http_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, 5)
        if self._http_sock is not None:
            self._http_sock.close()
        if self._run_lock is not None:
            os.close(self._run_lock)  # last: the record is gone and so is everything it named

    async def _drain_all(self) -> None:
        timeout = self.cfg.drain_timeout
        closing = [self.engine.close(drain=True, timeout=timeout)]
        if self.pool is not None:
            closing.append(self.pool.close(drain=True, timeout=timeout))
        await asyncio.gather(*closing)


def _recorded_owner() -> str:
    """' (pid N, URL)' from the running server's record, or '' when it cannot be read."""
    try:
        info = json.loads(server_info_path().read_text())
        return f" (pid {int(info['pid'])}, {info.get('http') or ' '.join(info.get('zmq', []))})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(cfg: ServeConfig) -> int:
    """Serve until a signal (0 after a clean stop) or until an engine dies: ServeError naming why."""
    server = Server(cfg)
    code = asyncio.run(server.run())
    if server.failure is not None:
        raise ServeError(f"stopped: {server.failure}")
    return code
