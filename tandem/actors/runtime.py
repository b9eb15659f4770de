"""Child side of an actor: the bootstrap that runs in the spawned process, and the context its entry gets.

Exit paths, all of which run the registered cleanups once:
- entry returns -> exit 0; entry raises (or cannot be imported) -> ActorFailed to the parent, exit 1;
- Stop message, SIGTERM or parent death set ``stop_event`` and the entry is expected to return;
- a second SIGTERM, or the entry still running ``exit_grace`` s after the parent died -> forced exit 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from tandem.actors.logs import configure_logging
from tandem.actors.sockets import CONTROL_LINGER_MS, DATA_LINGER_MS, close_socket, drain, make_socket
from tandem.actors.spec import ActorSpec
from tandem.messages import (
    PROTOCOL_VERSION,
    ActorFailed,
    Heartbeat,
    Ready,
    Stop,
    encode,
)

log = logging.getLogger(__name__)

_WATCHDOG_PERIOD = 0.25  # parent-death detection latency when PR_SET_PDEATHSIG did not fire
_SEND_TIMEOUT_MS = 5000  # Ready / ActorFailed: the parent is bound before we start, so this is ample
_FORCED_CLEANUP_TIMEOUT = 5.0
_INBOX_MAX_MSG = 1 << 16  # control messages are tiny
_PR_SET_PDEATHSIG = 1
# Not SIGTERM: Linux sends the parent-death signal each time a thread of the parent that we are
# (re)parented to exits, so a SIGKILLed parent with several threads delivers it several times
# (seen: two SIGTERMs, which read as "second SIGTERM, force exit"), and it also fires when only the
# spawning thread exits. A signal of its own lets the handler check getppid() and ignore those.
_PDEATH_SIGNAL = signal.SIGHUP


class ActorContext:
    """What an entry function gets. Use ``inbox`` and ``poll_inbox`` from the entry's thread only."""

    def __init__(
        self, spec: ActorSpec, control_addr: str, inbox_addr: str, parent_pid: int, zmq_ctx: zmq.Context
    ) -> None:
        self.name = spec.name
        self.config: Any = spec.config
        self.runtime_dir: Path = spec.runtime_dir
        self.parent_pid = parent_pid
        self.zmq_ctx = zmq_ctx
        self.stop_event = threading.Event()
        self.stop_message: Stop | None = None
        self.stop_reason = ""  # "Stop message: ...", "SIGTERM", "parent died"
        self._spec = spec
        self._control_addr = control_addr
        self._cleanups: list[Callable[[], None]] = []
        self._control_lock = threading.Lock()
        # IMMEDIATE + SNDTIMEO: a send blocks until the pipe to the parent exists, at most 5 s,
        # rather than queueing forever for a parent that is gone.
        self._control = make_socket(
            zmq_ctx, zmq.PUSH, linger_ms=CONTROL_LINGER_MS, immediate=True, heartbeat_ivl_ms=None
        )
        self._control.setsockopt(zmq.SNDTIMEO, _SEND_TIMEOUT_MS)
        self._control.connect(control_addr)
        self.inbox = make_socket(
            zmq_ctx, zmq.PULL, linger_ms=DATA_LINGER_MS, max_msg_size=_INBOX_MAX_MSG, heartbeat_ivl_ms=None
        )
        self.inbox.connect(inbox_addr)
        self._ready_sent = False
        self._heartbeat_stop = threading.Event()
        self._entry_done = threading.Event()
        self._sigterms = 0

    # ---- API for entries ------------------------------------------------------------------
    def send_ready(self, info: dict[str, Any] | None = None) -> None:
        """Tell the parent the actor is up; ``info`` (msgpack-able) reaches it as ``handle.ready.info``."""
        if self._ready_sent:
            log.warning("%s: send_ready called twice; ignored", self.name)
            return
        self._ready_sent = True
        self._send_control(Ready(self.name, os.getpid(), PROTOCOL_VERSION, dict(info or {})))

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on every exit path, forced ones included; last added runs first."""
        self._cleanups.append(fn)

    def poll_inbox(self) -> Stop | None:
        """Read what the parent sent, without blocking; returns the Stop received now, if any."""
        got: Stop | None = None
        for msg in drain(self.inbox, self.name):
            if isinstance(msg, Stop):
                got = self.stop_message = msg
                self.request_stop(f"Stop message: {msg.reason}" if msg.reason else "Stop message")
            else:
                log.warning("%s: unexpected %s in inbox; ignored", self.name, type(msg).__name__)
        return got

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Block until asked to stop (Stop message, SIGTERM, parent death) or ``timeout``; True if asked."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stop_event.is_set():
            slice_s = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if slice_s <= 0:
                break
            # Short slices: SIGTERM and the watchdog set stop_event without waking this poll.
            if self.inbox.poll(int(slice_s * 1000) or 1):
                self.poll_inbox()
        return self.stop_event.is_set()

    def request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            self.stop_reason = reason
            log.info("%s: stopping (%s)", self.name, reason)
        self.stop_event.set()

    def stop_heartbeat(self) -> None:
        """Stop sending heartbeats, as a hung process would (tests of the parent's watchdog)."""
        self._heartbeat_stop.set()

    # ---- bootstrap internals ------------------------------------------------------------------
    def _send_control(self, msg: Any) -> bool:
        with self._control_lock:
            try:
                self._control.send(encode(msg))
                return True
            except zmq.ZMQError as e:  # Again after SNDTIMEO: the parent is not there
                log.error("%s: could not send %s to the parent: %s", self.name, type(msg).__name__, e)
                return False

    def _run_cleanups(self) -> None:
        # list.pop is atomic, so a forced exit racing the normal path never runs a cleanup twice.
        while True:
            try:
                fn = self._cleanups.pop()
            except IndexError:
                return
            try:
                fn()
            except Exception:
                log.exception("%s: cleanup %r failed", self.name, fn)

    def _force_exit(self, why: str) -> None:
        log.error("%s: forced exit: %s", self.name, why)
        # Called from a signal handler or the watchdog while the entry may hold locks a cleanup
        # needs: run them in a thread and give up waiting rather than hang the exit.
        worker = threading.Thread(target=self._run_cleanups, name=f"{self.name}-cleanup", daemon=True)
        worker.start()
        worker.join(_FORCED_CLEANUP_TIMEOUT)
        if worker.is_alive():
            log.error(
                "%s: cleanups still running after %.0f s; exiting without them",
                self.name,
                _FORCED_CLEANUP_TIMEOUT,
            )
        for stream in (sys.stderr, sys.stdout):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(1)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        self._sigterms += 1
        if self._sigterms > 1:
            self._force_exit("second SIGTERM")
        self.request_stop("SIGTERM")

    def _on_parent_signal(self, signum: int, frame: object) -> None:
        if os.getppid() != self.parent_pid:
            self.request_stop("parent died")  # the watchdog enforces exit_grace

    def _heartbeat_loop(self) -> None:
        # Its own socket: zmq sockets must not be shared between threads without a lock, and this
        # thread must never wait on the entry's thread.
        sock = make_socket(self.zmq_ctx, zmq.PUSH, linger_ms=0, immediate=True, heartbeat_ivl_ms=None)
        try:
            sock.connect(self._control_addr)
            pid = os.getpid()
            while not self._heartbeat_stop.is_set():
                with contextlib.suppress(zmq.Again):  # parent gone or busy: the next beat will do
                    sock.send(encode(Heartbeat(self.name, pid, time.time())), zmq.NOBLOCK)
                self._heartbeat_stop.wait(self._spec.heartbeat_interval)
        except zmq.ZMQError as e:
            if not self._heartbeat_stop.is_set():
                log.error("%s: heartbeat thread failed: %s", self.name, e)
        finally:
            sock.close(linger=0)

    def _watchdog_loop(self) -> None:
        while os.getppid() == self.parent_pid:
            if self._entry_done.wait(_WATCHDOG_PERIOD):
                return
        self.request_stop("parent died")
        if not self._entry_done.wait(self._spec.exit_grace):
            self._force_exit(f"entry still running {self._spec.exit_grace:.1f} s after the parent died")


def bootstrap(spec: ActorSpec, control_addr: str, inbox_addr: str, parent_pid: int) -> None:
    """The spawned process's target: set up, run the entry, report, clean up, exit."""
    configure_logging(spec.log_level)
    # Ctrl-C reaches the whole process group; the parent decides how its children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    zctx = zmq.Context()
    ctx = ActorContext(spec, control_addr, inbox_addr, parent_pid, zctx)
    signal.signal(signal.SIGTERM, ctx._on_sigterm)
    signal.signal(_PDEATH_SIGNAL, ctx._on_parent_signal)
    _set_parent_death_signal()
    heart = threading.Thread(target=ctx._heartbeat_loop, name=f"{spec.name}-heartbeat", daemon=True)
    heart.start()
    threading.Thread(target=ctx._watchdog_loop, name=f"{spec.name}-watchdog", daemon=True).start()

    code = 0
    try:
        _import_entry(spec.entry)(ctx)
    except BaseException as e:
        code = _exit_code(e)
        if code:
            # Before ready the parent raises ActorStartError carrying the traceback, and the
            # reason is usually the user's to fix (memory, a model file): one line here, so
            # `serve` fails with a readable error rather than a screen of tracebacks per actor.
            started = ctx._ready_sent
            log.error("%s: %s", spec.name, _one_line(e), exc_info=e if started else None)
            if not started:
                log.debug("%s: failed before ready", spec.name, exc_info=e)
            ctx._send_control(ActorFailed(spec.name, os.getpid(), _one_line(e), traceback.format_exc()))
    finally:
        ctx._entry_done.set()
        ctx._run_cleanups()
        from tandem.actors.handle import stop_all  # nested actors this one forgot to stop

        stop_all()
        ctx._heartbeat_stop.set()
        heart.join(timeout=1.0)
        close_socket(ctx.inbox)
        close_socket(ctx._control)  # keeps its LINGER, so a final ActorFailed still leaves
        zctx.destroy(linger=DATA_LINGER_MS)
    if code:
        sys.exit(code)


def _exit_code(e: BaseException) -> int:
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 1


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    line = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return line if len(line) <= 2000 else line[:1997] + "..."


def _import_entry(entry: str) -> Callable[[ActorContext], None]:
    module_name, _, attr = entry.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"actor entry {entry!r} is not callable")
    return obj


def _set_parent_death_signal() -> None:
    """Ask Linux to signal us when the parent dies: faster than the watchdog's polling, best effort.

    A parent that died before this call is caught by the watchdog's first getppid() check.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, _PDEATH_SIGNAL, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        log.debug("prctl unavailable: %s", e)
