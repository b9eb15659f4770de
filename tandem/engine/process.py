"""Start the scheduler process (which starts the worker) and hold the sockets to it.

Works with a plain or an asyncio ZeroMQ context: the CLI's one-shot ``generate`` uses the
former, the ``serve`` gateway the latter. Binding happens here, in the longest-lived process,
so children only ever connect.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq

from tandem.actors import ActorHandle, ActorSpec
from tandem.actors.sockets import (
    INTERNAL_HEARTBEAT,
    ipc_address,
    make_runtime_dir,
    make_socket,
    remove_runtime_dir,
)
from tandem.config import EngineConfig
from tandem.scheduler.process import SchedulerBoot
from tandem.tokenizer.model_files import read_config_and_tokenizer
from tandem.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class EngineProcess:
    def __init__(self, cfg: EngineConfig, zmq_ctx: zmq.Context | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.zmq_ctx = zmq_ctx or zmq.Context.instance()
        self.scheduler: ActorHandle | None = None
        self.runtime_dir: Path | None = None
        self.to_sched: zmq.Socket | None = None
        self.from_sched: zmq.Socket | None = None
        self.ready_info: dict = {}
        self.tokenizer: Tokenizer | None = None
        self._req_addr = self._out_addr = ""

    def start(self) -> EngineProcess:
        """Blocking: returns once the worker has loaded the model and the scheduler is ready."""
        self.bind()
        return self.spawn()

    def bind(self) -> None:
        """Create and bind our sockets (in the thread that will use them: asyncio sockets care)."""
        cfg = self.cfg
        self.runtime_dir = cfg.runtime_dir or make_runtime_dir()
        cfg.runtime_dir = self.runtime_dir
        try:
            self._req_addr = ipc_address(self.runtime_dir, "requests")
            self._out_addr = ipc_address(self.runtime_dir, "outputs")
            self.to_sched = make_socket(
                self.zmq_ctx, zmq.PUSH, linger_ms=0, heartbeat_ivl_ms=INTERNAL_HEARTBEAT
            )
            self.to_sched.bind(self._req_addr)
            self.from_sched = make_socket(
                self.zmq_ctx, zmq.PULL, linger_ms=0, heartbeat_ivl_ms=INTERNAL_HEARTBEAT
            )
            self.from_sched.bind(self._out_addr)
        except BaseException:
            self.close()
            raise

    def spawn(self) -> EngineProcess:
        """Blocking: load the tokenizer, start the scheduler (and through it the worker)."""
        cfg = self.cfg
        assert self.runtime_dir is not None, "bind() first"
        try:
            # Validates the file too, so a bad one fails here, in one line, before any child starts.
            self.tokenizer = read_config_and_tokenizer(cfg.model_path)[1]
            spec = ActorSpec(
                "scheduler",
                "tandem.scheduler.process:scheduler_main",
                SchedulerBoot(cfg, self._req_addr, self._out_addr),
                self.runtime_dir,
                log_level=cfg.log_level,
            )
            # The actor's own control channel is plain ZeroMQ whatever our context is.
            self.scheduler = ActorHandle.start(spec)
            self.ready_info = dict(self.scheduler.ready.info)
        except BaseException:
            self.close()
            raise
        return self

    @property
    def context_length(self) -> int:
        return int(self.ready_info.get("context_length", 0))

    def check(self) -> str | None:
        """None while the scheduler is healthy, else why not (one line)."""
        if self.scheduler is None:
            return "engine not started"
        self.scheduler.handle_control()
        return self.scheduler.check()

    def close(self, drain: bool = False, timeout: float = 10.0) -> int | None:
        code = None
        if self.scheduler is not None:
            code = self.scheduler.stop(timeout=timeout, reason="drain" if drain else "shutdown")
            self.scheduler = None
        for s in (self.to_sched, self.from_sched):
            if s is not None and not s.closed:
                s.close(linger=0)
        self.to_sched = self.from_sched = None
        if self.runtime_dir is not None:
            remove_runtime_dir(self.runtime_dir)
            self.runtime_dir = None
        return code

    def __enter__(self) -> EngineProcess:
        return self.start() if self.scheduler is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()
