"""What a server's processes hold, read from /proc: resident memory, open fds, threads, and the
shared-memory segments they made (named tandem-{creator pid}-...)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")


def process_tree(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree = {pid}
    grew = True
    while grew:
        below = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= below
        grew = bool(below)
    return tree


def is_resource_tracker(pid: int) -> bool:
    """multiprocessing's helper process: the interpreter's, not one of the server's roles."""
    try:
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@dataclass(frozen=True)
class ProcStat:
    pid: int
    rss_kb: int
    fds: int
    threads: int


def proc_stat(pid: int) -> ProcStat | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return ProcStat(pid, rss, fds, threads)


def tree_stats(pid: int) -> dict[int, ProcStat]:
    """Every process of the tree but multiprocessing's resource tracker."""
    found = {p: proc_stat(p) for p in process_tree(pid) if not is_resource_tracker(p)}
    return {p: s for p, s in found.items() if s is not None}


def shm_segments(pids: set[int]) -> set[str]:
    """Segments in /dev/shm whose creator is one of ``pids`` (other tandem runs on the machine
    make their own, which are not this server's business)."""
    out: set[str] = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(SHM_DIR):
            parts = name.split("-")
            if len(parts) >= 3 and parts[0] == "tandem" and parts[1].isdigit() and int(parts[1]) in pids:
                out.add(name)
    return out
