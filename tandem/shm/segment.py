"""POSIX shm segments at the OS level: names, /dev/shm space, untracked attach, stale cleanup.

Python 3.11's resource_tracker is the hazard here:
an attacher that registers a segment gets it unlinked behind the creator's back, and an
attacher that registers then unregisters (in a spawn child, which shares the creator's
tracker) erases the creator's own registration, so the creator's `unlink()` later makes
the tracker print a KeyError traceback. Hence attach never registers at all.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import secrets
import sys
import threading
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*")
_attach_lock = threading.Lock()


class ShmSpaceError(RuntimeError):
    """/dev/shm cannot hold the ring; raised at startup instead of a SIGBUS mid-run."""

    def __init__(self, needed: int, free: int, path: Path | str = SHM_DIR) -> None:
        self.needed = needed
        self.free = free
        suggest_mib = max(256, math.ceil(2 * needed / 2**20))
        super().__init__(
            f"{path} has {free} bytes free but the shared-memory ring needs {needed} bytes "
            f"({needed / 2**20:.1f} MiB). Free space in {path}, lower max_num_batched_tokens / "
            f"max_num_seqs, or, in Docker, start the container with a larger /dev/shm, "
            f"e.g. `docker run --shm-size={suggest_mib}m ...` (the default is 64 MB)."
        )


def check_shm_space(needed: int, path: Path | str = SHM_DIR) -> None:
    """Raise ShmSpaceError if `path` has fewer than `needed` bytes free."""
    try:
        st = os.statvfs(path)
    except FileNotFoundError:  # no /dev/shm (not Linux): shm_open manages its own space
        logger.debug("%s not found; skipping the free-space check", path)
        return
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise ShmSpaceError(needed, free, path)


def segment_name(prefix: str) -> str:
    """`{prefix}-{pid}-{8 hex}`: the pid lets a later server tell a dead owner's segment."""
    check_prefix(prefix)
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


def check_prefix(prefix: str) -> None:
    if len(prefix) > 64 or not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"shm prefix {prefix!r} must be 1-64 chars of [A-Za-z0-9_.-], not starting with '-'")


def _name_re(prefix: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(prefix)}-(\d+)-[0-9a-f]{{8}}")


def list_segments(prefix: str = "tandem", pid: int | None = None, shm_dir: Path | str = SHM_DIR) -> list[str]:
    """Names in /dev/shm made by `segment_name(prefix)` (optionally only those of `pid`).
    For leak checks: a test snapshots this before and compares after."""
    check_prefix(prefix)
    pattern = _name_re(prefix)
    try:
        entries = os.listdir(shm_dir)
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m and (pid is None or int(m.group(1)) == pid):
            out.append(entry)
    return sorted(out)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never a server's pid; "alive" means "leave it alone"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def cleanup_stale_segments(prefix: str = "tandem", shm_dir: Path | str = SHM_DIR) -> list[str]:
    """Unlink `{prefix}-{pid}-{hex}` segments whose pid is dead; return their names.

    Pids are read in this pid namespace: containers sharing /dev/shm (`--ipc=host`) with
    their own pid namespaces must use distinct prefixes."""
    removed = []
    uid = os.geteuid()
    pattern = _name_re(prefix)
    for name in list_segments(prefix, shm_dir=shm_dir):
        m = pattern.fullmatch(name)
        assert m is not None
        pid = int(m.group(1))
        if pid == os.getpid() or pid_alive(pid):
            continue
        path = Path(shm_dir) / name
        try:
            if path.stat().st_uid != uid:
                continue  # someone else's; the sticky /dev/shm would refuse anyway
            path.unlink()
        except FileNotFoundError:
            continue  # another server's startup got there first
        except PermissionError as e:
            logger.warning("cannot remove stale shm segment %s: %s", name, e)
            continue
        removed.append(name)
    if removed:
        logger.info("removed %d stale shm segment(s) of dead processes: %s", len(removed), removed)
    return removed


def preallocate(shm: shared_memory.SharedMemory, size: int) -> None:
    """Make tmpfs back every page now: ENOSPC here, not SIGBUS on first touch later."""
    fd = getattr(shm, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                free = _free_bytes()
                raise ShmSpaceError(size, free) from e
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENODEV):
                raise
            # unsupported: fall through to zeroing (a SIGBUS risk, but the check above ran)
    mv = shm.buf
    chunk = bytes(min(size, 1 << 20))
    for off in range(0, size, len(chunk)):
        n = min(len(chunk), size - off)
        mv[off : off + n] = chunk[:n]


def _free_bytes() -> int:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def ensure_owner_only(shm: shared_memory.SharedMemory) -> None:
    """CPython opens with 0600 on POSIX; enforce it in case a umask or runtime differs."""
    fd = getattr(shm, "_fd", -1)
    if fd < 0:
        return
    mode = os.fstat(fd).st_mode & 0o777
    if mode != 0o600:
        logger.debug("shm segment %s had mode %o; setting 0600", shm.name, mode)
        os.fchmod(fd, 0o600)


def attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without registering it with this process's resource tracker."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    # Before 3.13 the only way is to skip the register call SharedMemory.__init__ makes
    # (what vLLM's ShmRingBuffer does). The lock keeps our own attaches from racing the swap;
    # other segment types and names still reach the real register.
    with _attach_lock:
        real_register = resource_tracker.register

        def register(rname: str, rtype: str) -> None:
            if rtype == "shared_memory" and rname.lstrip("/") == name:
                return
            real_register(rname, rtype)

        resource_tracker.register = register
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = real_register
