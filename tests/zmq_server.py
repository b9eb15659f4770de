"""The ZeroMQ front end on a real engine in this process, for tests that need its internals.

`ServerThread` runs AsyncEngine + ZmqFrontend on their own event loop in a background thread on a
tiny GGUF; tests talk to it over ipc and tcp like any client would, and read the scheduler's Stats
through the engine to see that cancelled requests really free their slot and KV blocks. `Raw` is a
bare DEALER that sends frames exactly as the protocol describes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from procs import descendants, wait_until

from tandem.actors.sockets import ipc_path
from tandem.config import EngineConfig
from tandem.engine.aio import AsyncEngine
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.gateway.zmq_frontend import ZmqFrontend
from tandem.messages import Finished, KeepAlive, RequestError, SamplingParams, Stats, decode, encode
from tandem.shm import list_segments

MAX_MSG = 1 << 20
CONTEXT = 4096
# ~10 s on the tiny model: a test that sees it end early knows it was cancelled
LONG = SamplingParams(max_tokens=CONTEXT - 100, temperature=0.0, ignore_eos=True)


class ServerThread:
    """AsyncEngine + ZmqFrontend on their own event loop in a thread."""

    def __init__(self, cfg: EngineConfig, endpoints: list[str]) -> None:
        self.cfg, self.endpoints_asked = cfg, endpoints
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="test-server")

    def start(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(60), "server did not start"
        if self.error:
            raise self.error
        return self

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.engine = AsyncEngine(self.cfg)
        try:
            await self.engine.start()
            self.frontend = await ZmqFrontend(self.engine, self.endpoints_asked, max_msg_size=MAX_MSG).start()
        except BaseException as e:
            self.error = e
            await self.engine.close()
            self.ready.set()
            return
        self.ready.set()
        await self._stop.wait()
        await self.frontend.close()
        await self.engine.close()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> Stats:
        return self.call(self.engine.stats())

    def idle(self) -> bool:
        s = self.stats()
        return s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def serve_tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """A ServerThread on ipc and tcp; on leaving, checks that its processes, ring and sockets are gone."""
    model = write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", TinySpec(context=CONTEXT))
    # float32: outputs are compared across batchings token for token (bf16 is not batch-invariant).
    cfg = EngineConfig(model_path=str(model), kv_cache_memory=64 * 2**20, model_name="tiny", dtype="float32")
    others = descendants(os.getpid())  # servers of session-scoped fixtures elsewhere in the run
    srv = ServerThread(cfg, ["ipc://", "tcp://127.0.0.1:0"]).start()
    kids = descendants(os.getpid()) - others
    assert kids, "the engine's processes should be running"
    # Other test runs may share /dev/shm: look only at segments named after our processes.
    ours = lambda: {s for p in kids | {os.getpid()} for s in list_segments(pid=p)}  # noqa: E731
    assert ours(), "the engine's ring segment should exist"
    ipc_dir = ipc_path(srv.frontend.endpoints[0]).parent  # type: ignore[union-attr]
    engine_dir = srv.engine.process.runtime_dir
    assert ipc_dir.stat().st_mode & 0o777 == 0o700
    yield srv
    srv.stop()
    wait_until(lambda: not (kids & descendants(os.getpid())), 5.0)
    assert not ours(), "shared-memory segments left behind"
    assert not ipc_dir.exists() and engine_dir is not None and not engine_dir.exists()


class Raw:
    """A bare DEALER: frames exactly as the protocol describes them, no client library."""

    def __init__(self, url: str, envelope: bool = False) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.envelope = envelope

    def send(self, msg: Any) -> None:
        self.send_bytes(encode(msg))

    def send_bytes(self, *frames: bytes) -> None:
        self.sock.send_multipart([b"", *frames] if self.envelope else list(frames))

    def recv(self, timeout: float = 5.0) -> Any:
        while True:
            assert self.sock.poll(int(timeout * 1000)), "no reply"
            frames = self.sock.recv_multipart()
            if self.envelope:
                assert frames[0] == b"" and len(frames) == 2
            msg = decode(frames[-1])
            if not isinstance(msg, KeepAlive):
                return msg

    def until_terminals(self, rids: set[str], timeout: float = 20.0) -> dict[str, list[Any]]:
        """Every frame per request id until each has a terminal, plus a quiet period for extras."""
        frames: dict[str, list[Any]] = {r: [] for r in rids}
        deadline, quiet_until = time.monotonic() + timeout, None
        while quiet_until is None or time.monotonic() < quiet_until:
            assert time.monotonic() < deadline, {r: f[-1:] for r, f in frames.items()}
            if not self.sock.poll(50):
                continue
            msg = decode(self.sock.recv_multipart()[-1])
            if isinstance(msg, KeepAlive):
                continue
            frames.setdefault(msg.request_id, []).append(msg)
            if quiet_until is None and all(
                f and isinstance(f[-1], Finished | RequestError) for f in frames.values()
            ):
                quiet_until = time.monotonic() + 0.3
        return frames

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
