"""Fixtures for multiprocess tests: real engines on tiny models, and a leak check around each test."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_driver import make_engine
from procs import children

from tandem.engine.process import EngineProcess
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.shm import list_segments


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TinySpec(context=1024))


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Whatever the test started must be gone when it ends: processes, shm segments, ipc files."""
    before_children = children(os.getpid())
    before_segments = set(list_segments())
    yield
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (
        children(os.getpid()) - before_children or multiprocessing.active_children()
    ):
        time.sleep(0.05)
    left = children(os.getpid()) - before_children
    assert left == set(), "child processes left behind: " + "; ".join(
        Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200] for p in left
    )
    # Segment names carry their creator's pid; other test runs on this machine may own live ones.
    leaked = {s for s in set(list_segments()) - before_segments if not _alive(int(s.split("-")[1]))}
    assert leaked == set(), "shared-memory segments left behind"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Iterator[EngineProcess]:
    eng = make_engine(tiny_gguf)
    yield eng
    rt = eng.runtime_dir
    eng.close()
    assert rt is not None and not rt.exists(), "runtime dir with ipc files left behind"
