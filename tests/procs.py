"""Process-tree helpers the multiprocess tests share: who runs below whom, from /proc (no psutil),
and polling until a condition holds."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name: state, ppid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def parents() -> dict[int, int]:
    """pid -> parent pid of every process, but multiprocessing's resource tracker (a long-lived
    helper of the interpreter that started it, not something a test started)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        with contextlib.suppress(OSError):
            if fields is not None and b"resource_tracker" not in (entry / "cmdline").read_bytes():
                found[int(entry.name)] = int(fields[1])
    return found


def children(pid: int) -> set[int]:
    """Live (not zombie) direct children of ``pid``."""
    return {p for p, pp in parents().items() if pp == pid and running(p)}


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``."""
    tree = parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in tree.items() if pp in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (one that has exited and only waits to be reaped)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def wait_until(cond: Callable[[], Any], timeout: float, step: float = 0.02) -> float:
    """Seconds until ``cond()`` held; AssertionError after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0
