"""Parent side of an actor: spawn it, wait for Ready, watch its health, stop it.

A handle is meant for one owning thread (its sockets are not thread-safe). Start actors from a
thread that lives as long as they do: Linux's parent-death signal fires when the spawning *thread*
exits, not only the process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.util  # before atexit.register below: see stop_all
import os
import signal
import time
from typing import Any

import zmq

from tandem.actors.runtime import bootstrap
from tandem.actors.sockets import close_socket, drain, ipc_address, make_socket, remove_ipc_file
from tandem.actors.spec import ActorSpec, ActorStartError
from tandem.messages import ActorFailed, Heartbeat, Ready, Stop, encode

log = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")  # CUDA cannot survive fork
_LATE_FAILURE_WAIT = 0.2  # an ActorFailed can trail the exit it explains by a moment
_LIVE: set[ActorHandle] = set()


class ActorHandle:
    def __init__(
        self,
        spec: ActorSpec,
        process: Any,
        control: zmq.Socket,
        inbox: zmq.Socket,
        addresses: tuple[str, str],
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.pid: int = process.pid
        self.ready: Ready | None = None
        self.failure: ActorFailed | None = None  # the child's own report of why it failed
        self.control_socket = control  # owners may register it in their zmq.Poller
        self.last_heartbeat = time.monotonic()  # any control message counts
        self._process = process
        self._inbox = inbox
        self._addresses = addresses
        self._pending: list[Any] = []  # messages check() read on the owner's behalf
        self._exitcode: int | None = None
        self._closed = False
        self._waited_for_failure = False

    @classmethod
    def start(cls, spec: ActorSpec, zmq_ctx: zmq.Context | None = None) -> ActorHandle:
        """Spawn the actor and return once it has sent Ready; raise ActorStartError otherwise."""
        zctx = zmq_ctx or zmq.Context.instance()
        ctl_addr = ipc_address(spec.runtime_dir, f"{spec.name}-ctl")
        inbox_addr = ipc_address(spec.runtime_dir, f"{spec.name}-inbox")
        control = make_socket(zctx, zmq.PULL, linger_ms=0, heartbeat_ivl_ms=None)
        inbox = make_socket(zctx, zmq.PUSH, linger_ms=0, heartbeat_ivl_ms=None, sndhwm=16)
        try:
            # Bound before the spawn, so the child can never connect to a path that is not there yet.
            control.bind(ctl_addr)
            inbox.bind(inbox_addr)
            process = _SPAWN.Process(
                target=bootstrap, name=spec.name, args=(spec, ctl_addr, inbox_addr, os.getpid())
            )
            process.start()
        except Exception as e:
            for sock in (control, inbox):
                close_socket(sock, 0)
            for addr in (ctl_addr, inbox_addr):
                remove_ipc_file(addr)
            raise ActorStartError(spec.name, f"could not spawn: {type(e).__name__}: {e}") from e
        handle = cls(spec, process, control, inbox, (ctl_addr, inbox_addr))
        _LIVE.add(handle)
        try:
            handle._wait_ready()
        except BaseException:
            handle.stop(timeout=2.0, reason="start failed")
            raise
        log.info("%s started (pid %d)", spec.name, handle.pid)
        return handle

    def _wait_ready(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control_socket, zmq.POLLIN)
        poller.register(self._process.sentinel, zmq.POLLIN)  # readable once the child has exited
        deadline = time.monotonic() + self.spec.ready_timeout
        while True:
            for msg in self._drain():
                if isinstance(msg, Ready):
                    self.ready = msg
                    return
                if isinstance(msg, ActorFailed):
                    raise ActorStartError(self.name, msg.error, msg.traceback)
            if not self._process.is_alive():
                self._await_failure()
                if self.failure is not None:
                    raise ActorStartError(self.name, self.failure.error, self.failure.traceback)
                raise ActorStartError(self.name, self._describe_exit(self._process.exitcode))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ActorStartError(self.name, f"not ready within {self.spec.ready_timeout:g} s")
            poller.poll(int(min(remaining, 1.0) * 1000) + 1)

    # ---- health ------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        return not self._closed and self._process.is_alive()

    @property
    def exitcode(self) -> int | None:
        """None while running; negative -N when killed by signal N."""
        return self._exitcode if self._closed else self._process.exitcode

    @property
    def sentinel(self) -> int:
        """An fd that becomes readable when the process exits (zmq.Poller accepts raw fds)."""
        return self._process.sentinel

    def handle_control(self) -> list[Any]:
        """Read every waiting control message without blocking; returns them decoded, oldest first."""
        msgs, self._pending = self._pending, []
        if not self._closed:
            msgs += self._drain()
        return msgs

    def check(self) -> str | None:
        """None while healthy, else one line saying what is wrong with the actor."""
        if self._closed:
            return f"{self.name} was stopped (exit code {self._exitcode})"
        self._pending += [m for m in self._drain() if not isinstance(m, Heartbeat)]
        code = self._process.exitcode
        if code is not None:
            if code > 0:
                self._await_failure()
            return self._describe_exit(code)
        if self.failure is not None:  # still alive, running its cleanups
            return f"{self.name} failed: {self.failure.error}"
        silent = time.monotonic() - self.last_heartbeat
        if silent > self.spec.heartbeat_timeout:
            return f"{self.name} sent no heartbeat for {silent:.1f} s"
        return None

    # ---- shutdown ----------------------------------------------------------------------------
    def request_stop(self, reason: str = "", drain: bool = False) -> bool:
        """Send Stop without waiting; False if it could not be queued (actor gone or not reading)."""
        if not self.is_alive():
            return False
        try:
            self._inbox.send(encode(Stop(reason, drain)), zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def stop(self, timeout: float = 5.0, reason: str = "") -> int | None:
        """Stop message, then SIGTERM, a second SIGTERM (forced exit with cleanups), then SIGKILL.

        Returns the exit code; idempotent. Takes about ``timeout`` at most, plus a moment after SIGKILL.
        """
        if self._closed:
            return self._exitcode
        try:
            if self.is_alive():
                self.request_stop(reason)
                self._process.join(timeout * 0.6)
                for sig, share in ((signal.SIGTERM, 0.25), (signal.SIGTERM, 0.15), (signal.SIGKILL, None)):
                    if not self._process.is_alive():
                        break
                    log.warning("%s (pid %d) still running; sending %s", self.name, self.pid, sig.name)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                    self._process.join(timeout * share if share else 5.0)
        finally:
            self._close()
        log.info("%s stopped (exit code %s)", self.name, self._exitcode)
        return self._exitcode

    def kill(self) -> None:
        """SIGKILL now, no cleanups in the child; call stop() afterwards to release the handle."""
        if self.is_alive():
            self._process.kill()

    def __enter__(self) -> ActorHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- internals ---------------------------------------------------------------------------
    def _drain(self) -> list[Any]:
        msgs = list(drain(self.control_socket, self.name))
        if msgs:
            self.last_heartbeat = time.monotonic()
        for msg in msgs:
            if isinstance(msg, ActorFailed):
                self.failure = msg
        return msgs

    def _await_failure(self) -> None:
        """After a failed exit, give a trailing ActorFailed a moment to arrive (once)."""
        if self._waited_for_failure or self.failure is not None:
            return
        self._waited_for_failure = True
        deadline = time.monotonic() + _LATE_FAILURE_WAIT
        while self.failure is None and (left := deadline - time.monotonic()) > 0:
            if self.control_socket.poll(int(left * 1000) + 1):
                self._pending += [m for m in self._drain() if not isinstance(m, Heartbeat)]

    def _describe_exit(self, code: int | None) -> str:
        detail = f": {self.failure.error}" if self.failure is not None else ""
        if code is not None and code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            return f"{self.name} was killed by {sig}{detail}"
        return f"{self.name} process exited with code {code}{detail}"

    def _close(self) -> None:
        self._exitcode = self._process.exitcode
        with contextlib.suppress(zmq.ZMQError):
            self._pending += self._drain()  # keep a last ActorFailed for failure / handle_control
        close_socket(self.control_socket, 0)
        close_socket(self._inbox, 0)
        for addr in self._addresses:
            remove_ipc_file(addr)
        if self._exitcode is not None:
            self._process.close()  # releases the sentinel fd; repeated restarts would leak them
        else:
            log.error("%s (pid %d) survived SIGKILL; leaving it", self.name, self.pid)
        self._closed = True
        _LIVE.discard(self)


def stop_all(timeout: float = 2.0) -> None:
    """Stop every handle still running in this process (at exit, so no actor outlives its owner).

    Registered with atexit after multiprocessing's own exit hook, so it runs first: that hook joins
    non-daemon children and would otherwise wait forever on an actor nobody stopped.
    """
    for handle in list(_LIVE):
        try:
            handle.stop(timeout, reason="owner exiting")
        except Exception:
            log.exception("could not stop %s", handle.name)


atexit.register(stop_all)
