"""ZeroMQ socket options and ipc paths, set the same way in every process.

Why each option matters:
- LINGER: the default (-1) makes ``ctx.term()`` hang forever on a message queued to an absent peer.
- ZMTP heartbeats: without them a hung (SIGSTOPped) peer over tcp is never noticed. Links between
  a server's own processes (ipc) carry none (`INTERNAL_HEARTBEAT`): a heartbeat timeout drops the
  connection and silently loses the messages queued on it (a request the gateway had handed to a
  scheduler that stalled 3-5 s was never answered; a peer whose receive queue is full stops answering
  heartbeats too), while the actor heartbeats already catch a hung peer, and fail its requests, and a
  dead one's socket closes with it.
- RCVHWM 0 wherever heartbeats are on: libzmq (4.3.5 and earlier) aborts the whole process
  (``Assertion failed: !_io_error (stream_engine_base.cpp)``) when a connection fails while its
  receive queue is full and a heartbeat PING is then due (zeromq/libzmq#3937, #4767). A resumed
  SIGSTOPped client met it in CI; any peer that floods a busy gateway and then disconnects meets it
  on the server. An unbounded receive queue never stops reading, so that state cannot arise; what one
  client may have in flight is bounded by the gateway (``max_inflight_per_client``) instead.
- MAXMSGSIZE: bounds what an untrusted peer can make us allocate before msgpack sees it.
- ROUTER_MANDATORY: a ROUTER otherwise drops replies to unknown or slow peers silently.
- IMMEDIATE: queue only to completed connections, so a send to a peer that is gone fails (Again)
  instead of piling up messages that will never leave.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq

from tandem.messages import MessageError, decode

log = logging.getLogger(__name__)

CONTROL_LINGER_MS = 1000  # long enough to deliver a final ActorFailed, short enough not to stall exit
DATA_LINGER_MS = 0  # data left unsent at shutdown has nobody to go to
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
INTERNAL_HEARTBEAT = None  # heartbeat_ivl_ms for the data links between a server's own processes
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_IPC_PATH = 107


def make_socket(
    ctx: zmq.Context,
    socket_type: int,
    *,
    linger_ms: int = CONTROL_LINGER_MS,
    max_msg_size: int | None = None,
    immediate: bool = False,
    router_mandatory: bool | None = None,
    heartbeat_ivl_ms: int | None = HEARTBEAT_IVL_MS,
    heartbeat_timeout_ms: int = HEARTBEAT_TIMEOUT_MS,
    sndhwm: int | None = None,
    rcvhwm: int | None = None,
) -> zmq.Socket:
    """A socket with the house options set; call before bind/connect (options apply to new pipes).

    ``router_mandatory`` defaults to on for ROUTER sockets. ``max_msg_size`` should be set on every
    socket that receives from a peer we do not control (clients). ZMTP heartbeats only act on
    stream transports (tcp, ipc); ``heartbeat_ivl_ms=None`` turns them off. With heartbeats on the
    receive queue is unbounded (see the module docstring), so a ``rcvhwm`` is refused.
    """
    if heartbeat_ivl_ms is not None:
        if rcvhwm not in (None, 0):
            raise ValueError(
                f"rcvhwm={rcvhwm} with ZMTP heartbeats: libzmq aborts the process when such a "
                "connection fails with its receive queue full; leave rcvhwm unset"
            )
        rcvhwm = 0
    sock = ctx.socket(socket_type)
    try:
        sock.setsockopt(zmq.LINGER, linger_ms)
        if max_msg_size is not None:
            limit_message_size(sock, max_msg_size)
        if immediate:
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if router_mandatory or (router_mandatory is None and socket_type == zmq.ROUTER):
            set_router_mandatory(sock)
        if heartbeat_ivl_ms is not None:
            enable_heartbeats(sock, heartbeat_ivl_ms, heartbeat_timeout_ms)
        if sndhwm is not None:
            sock.setsockopt(zmq.SNDHWM, sndhwm)
        if rcvhwm is not None:
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def enable_heartbeats(
    sock: zmq.Socket,
    ivl_ms: int = HEARTBEAT_IVL_MS,
    timeout_ms: int = HEARTBEAT_TIMEOUT_MS,
    ttl_ms: int | None = None,
) -> None:
    """ZMTP PING every ``ivl_ms``; drop the connection when no traffic arrives for ``timeout_ms``.

    This proves the peer's I/O thread is alive, not that its main loop makes progress: pair it with
    an application heartbeat or progress watchdog.
    """
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl_ms)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    if ttl_ms is not None:
        sock.setsockopt(zmq.HEARTBEAT_TTL, ttl_ms)


def set_router_mandatory(sock: zmq.Socket) -> None:
    """Make sends to unknown peers raise EHOSTUNREACH and full peers raise Again (with NOBLOCK)."""
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


def limit_message_size(sock: zmq.Socket, max_bytes: int) -> None:
    """Disconnect a peer that sends a message larger than ``max_bytes``."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)


def close_socket(sock: zmq.Socket | None, linger_ms: int | None = None) -> None:
    """Close if open; ``linger_ms`` overrides the socket's LINGER (0: drop what is unsent)."""
    if sock is None or sock.closed:
        return
    sock.close(linger=linger_ms)


# --------------------------------------------------------------------------------------
# ipc endpoints and the per-server runtime directory
# --------------------------------------------------------------------------------------
def ipc_address(runtime_dir: Path, stem: str) -> str:
    """A fresh ``ipc://{runtime_dir}/{stem}-<rand>.sock`` whose file does not exist yet.

    libzmq silently unlinks an existing path on bind and orphans whoever was bound there, so the
    random suffix plus the existence check keep two servers or actors from stealing each other's path.
    """
    for _ in range(8):
        path = Path(runtime_dir) / f"{stem}-{secrets.token_hex(4)}.sock"
        if len(os.fsencode(path)) > MAX_IPC_PATH:
            raise ValueError(
                f"ipc path too long for a unix socket ({len(os.fsencode(path))} > "
                f"{MAX_IPC_PATH} bytes): {path}; use a shorter runtime directory"
            )
        if not path.exists():
            return f"ipc://{path}"
    raise FileExistsError(f"could not find a free ipc path in {runtime_dir}")


def ipc_path(address: str) -> Path | None:
    """The filesystem path of an ``ipc://`` address, None for other transports or abstract sockets."""
    if not address.startswith("ipc://"):
        return None
    rest = address[len("ipc://") :]
    if not rest or rest.startswith("@"):
        return None
    return Path(rest)


def remove_ipc_file(address: str) -> None:
    path = ipc_path(address)
    if path is None:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove ipc socket file %s: %s", path, e)


def make_runtime_dir(prefix: str = "tandem", base: Path | None = None) -> Path:
    """A fresh 0700 directory for one server's ipc socket files.

    Under ``base``, else ``$XDG_RUNTIME_DIR`` (per-user, tmpfs, cleaned at logout), else the system
    temp dir. The mode keeps other users from connecting whatever the umask made the socket files.
    """
    base = base or _runtime_base()
    cleanup_stale_runtime_dirs(prefix, base)
    # The owner's pid in the name: a server killed with SIGKILL cannot remove its directory,
    # the next one started here can.
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-", dir=base))
    os.chmod(path, 0o700)  # mkdtemp already asks for 0700; be explicit against odd filesystems
    return path


def _runtime_base() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK | os.X_OK):
        return Path(xdg)
    return Path(tempfile.gettempdir())


def cleanup_stale_runtime_dirs(prefix: str = "tandem", base: Path | None = None) -> list[Path]:
    """Remove ``{prefix}-*`` runtime directories whose owning process is gone."""
    removed = []
    for d in (base or _runtime_base()).glob(f"{prefix}-*-*"):
        pid_text = d.name[len(prefix) + 1 :].split("-", 1)[0]
        if not pid_text.isdigit() or not d.is_dir():
            continue  # another prefix sharing ours ("tandem-zmq-..."), or not ours at all
        pid = int(pid_text)
        try:
            os.kill(pid, 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
        log.info("removed stale runtime directory %s (owner %d is gone)", d, pid)
    return removed


def remove_runtime_dir(path: Path) -> None:
    """Remove a directory made by make_runtime_dir, with whatever socket files are left in it."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove runtime directory %s: %s", path, e)


def drain(
    sock: zmq.Socket, owner: str = "", on_error: Callable[[MessageError], None] | None = None
) -> Iterator[Any]:
    """Every message waiting on ``sock``, decoded, without blocking. Frames that do not decode
    are logged, passed to ``on_error`` (to answer a request that can still be told), and skipped:
    one bad peer frame must not take a process down."""
    while True:
        try:
            data = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            msg = decode(data)
        except MessageError as e:
            log.warning("%s: dropping a frame that does not decode: %s", owner or "socket", e)
            if on_error is not None:
                on_error(e)
            continue
        yield msg
