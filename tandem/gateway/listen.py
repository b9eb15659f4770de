"""Claiming `tandem serve`'s ports before anything else starts, and saying in one line why one cannot be had.

A busy port is found by binding the real listening socket (then handed to uvicorn), not by a probe
that another server could race. Who holds a port comes from /proc (the LISTEN socket's inode, then
the process with that inode open), else from a running tandem server's own record.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048  # uvicorn's default
_TCP_LISTEN = "0A"  # the state column of /proc/net/tcp for a listening socket


class ServeError(Exception):
    """A reason `tandem serve` cannot start that is the user's to fix; the message is one line."""


def listen_tcp(host: str, port: int, what: str) -> socket.socket:
    """A socket listening on host:port (port 0: a free one), as uvicorn would bind it."""
    address = host.strip("[]")  # an IPv6 address may come in URL brackets
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise bind_error(what, host, port, e) from None
    sock.set_inheritable(True)
    return sock


def bind_error(what: str, host: str, port: int, err: Exception) -> ServeError:
    """The one-line ServeError for a failed bind (OSError or zmq.ZMQError) of ``what`` on host:port."""
    where = f"{what} on {host}:{port}"
    if getattr(err, "errno", None) == errno.EADDRINUSE:
        owner = port_owner(port)
        held = f"in use by {owner}" if owner else "in use"
        return ServeError(f"cannot listen for {where}: port {port} is {held}")
    reason = getattr(err, "strerror", None) or str(err)
    return ServeError(f"cannot listen for {where}: {reason}")


def port_owner(port: int) -> str | None:
    """ "pid N (name)" of the process listening on TCP ``port``, when this user can tell."""
    pid = _listener_pid(port)
    if pid is not None:
        return f"pid {pid} ({_process_name(pid)})"
    pid = _recorded_server(port)
    return None if pid is None else f"pid {pid} (tandem serve)"


def is_loopback(host: str) -> bool:
    """True when ``host`` names only this machine (so nothing else can reach what listens there)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(name, None)}
    except OSError:
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == _TCP_LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    return inodes - {"0"}


def _listener_pid(port: int) -> int | None:
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not targets:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # another user's process, or one that just exited
            for fd in os.scandir(proc / "fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in targets:
                        return int(proc.name)
    return None


def _process_name(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    if b"serve" in argv and any(b"tandem" in a for a in argv):
        return "tandem serve"
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return "?"


def _recorded_server(port: int) -> int | None:
    """The pid in this user's tandem server record, if that server is alive and serves ``port``."""
    from tandem.gateway.server import server_info_path

    try:
        info = json.loads(server_info_path().read_text())
        pid = int(info["pid"])
        urls = [info.get("http") or "", *info.get("zmq", [])]
        ports = {urlsplit(u.replace("tcp://", "http://")).port for u in urls if "://" in u}
        os.kill(pid, 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if port in ports else None
