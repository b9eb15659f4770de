"""The shm ring: layout arithmetic, cross-process sharing, and that nothing is left in /dev/shm.

Run: python -m pytest tests/shm/test_ring.py -v
"""

from __future__ import annotations

import errno
import gc
import itertools
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.shm import (
    FIELD_ALIGN,
    RING_HEADER_SIZE,
    SHM_DIR,
    SLOT_ALIGN,
    FieldSpec,
    LayoutMismatchError,
    RingLayout,
    RingSegment,
    ShmSpaceError,
    batch_layout,
    cleanup_stale_segments,
    list_segments,
    unlink_owned_segments,
)

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="needs /dev/shm (Linux)")

SMALL = dict(max_num_batched_tokens=64, max_num_seqs=8, max_blocks_per_seq=4, depth=2)
TRACKER_NOISE = ("resource_tracker", "leaked", "Traceback", "KeyError", "Warning")


@pytest.fixture
def prefix() -> str:
    """A prefix of our own, and a leak check: no segment with it survives the test."""
    p = f"tandemtest{secrets.token_hex(3)}"
    yield p
    left = list_segments(p)
    for name in left:
        (SHM_DIR / name).unlink(missing_ok=True)
    assert left == [], f"test leaked shm segments: {left}"


def _run(script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _assert_quiet(stderr: str) -> None:
    assert not any(word in stderr for word in TRACKER_NOISE), stderr


# layout ----------------------------------------------------------------------------------


def test_batch_layout_has_the_specified_fields() -> None:
    lay = batch_layout(100, 10, 7, depth=3)
    spec = {f.name: (f.dtype, f.shape) for f in lay.fields}
    assert spec["header"] == ("int64", (8,))
    assert spec["input_ids"] == ("int64", (100,)) and spec["positions"] == ("int64", (100,))
    assert spec["cu_seqlens"] == ("int32", (11,))
    assert spec["block_tables"] == ("int32", (10, 7))
    for name in ("seq_slots", "query_lens", "context_lens", "top_k", "num_logprobs"):
        assert spec[name] == ("int32", (10,)), name
    floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    for name in floats:
        assert spec[name] == ("float32", (10,)), name
    for name in ("seed", "sample_step"):
        assert spec[name] == ("int64", (10,)), name
    assert spec["sample_mask"] == ("uint8", (10,)) and spec["want_logits"] == ("uint8", (10,))
    assert "stop_ids" not in spec
    assert batch_layout(100, 10, 7, 3, max_stop_ids=4).field("stop_ids").shape == (10, 4)


field_specs = st.lists(
    st.tuples(
        st.sampled_from(["int8", "uint8", "int32", "float32", "int64", "float64", "float16"]),
        st.lists(st.integers(0, 40), max_size=3),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(field_specs, st.integers(1, 4))
def test_offsets_are_aligned_disjoint_and_fit_the_slot(specs: list, depth: int) -> None:
    lay = RingLayout([FieldSpec(f"f{i}", dt, tuple(shape)) for i, (dt, shape) in enumerate(specs)], depth)
    spans = sorted((lay.offsets[f.name], lay.offsets[f.name] + f.nbytes) for f in lay.fields)
    for off, _ in spans:
        assert off % FIELD_ALIGN == 0
    for (_, end), (nxt, _) in itertools.pairwise(spans):
        assert end <= nxt
    last_end = max(end for _, end in spans)
    assert lay.slot_size % SLOT_ALIGN == 0 and last_end <= lay.slot_size < last_end + 2 * SLOT_ALIGN
    assert lay.total_size == RING_HEADER_SIZE + depth * lay.slot_size
    assert [lay.slot_offset(k) for k in range(depth)] == [
        RING_HEADER_SIZE + k * lay.slot_size for k in range(depth)
    ]


def test_wire_round_trip_through_msgpack_and_json() -> None:
    lay = batch_layout(**SMALL, max_stop_ids=3)
    for wire in (msgpack.unpackb(msgpack.packb(lay.to_wire())), json.loads(json.dumps(lay.to_wire()))):
        back = RingLayout.from_wire(wire)
        assert back == lay and back.fingerprint == lay.fingerprint
        assert back.offsets == lay.offsets and back.slot_size == lay.slot_size


def test_fingerprint_tracks_every_layout_change() -> None:
    base = batch_layout(**SMALL)
    variants = [
        batch_layout(**{**SMALL, "depth": 3}),
        batch_layout(**{**SMALL, "max_num_seqs": 9}),
        batch_layout(**SMALL, max_stop_ids=1),
        RingLayout(
            [
                f if f.name != "want_logits" else FieldSpec("want_logits", "int8", (8,), "seq")
                for f in base.fields
            ],
            2,
        ),
    ]
    assert len({base.fingerprint, *(v.fingerprint for v in variants)}) == 1 + len(variants)
    # spelling of a dtype is not a change
    assert RingLayout([FieldSpec("a", "i8", (3,))], 2) == RingLayout([FieldSpec("a", "int64", (3,))], 2)


def test_from_wire_detects_mismatch_and_garbage() -> None:
    wire = batch_layout(**SMALL).to_wire()
    with pytest.raises(LayoutMismatchError, match="fingerprint"):
        RingLayout.from_wire({**wire, "fingerprint": "0" * 32})
    with pytest.raises(LayoutMismatchError, match="fingerprint"):
        RingLayout.from_wire({**wire, "depth": 5})  # a field changed in flight
    with pytest.raises(LayoutMismatchError, match="version"):
        RingLayout.from_wire({**wire, "version": 99})
    with pytest.raises(LayoutMismatchError, match="malformed"):
        RingLayout.from_wire({**wire, "fields": [["x", "object", [1], None, 0]]})


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        RingLayout([FieldSpec("a", "int8", (1,)), FieldSpec("a", "int8", (1,))], 2)
    with pytest.raises(ValueError, match="dtype"):
        FieldSpec("a", ">i8", (1,))
    with pytest.raises(ValueError):
        RingLayout([FieldSpec("a", "int8", (1,))], 0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        batch_layout(64, 0, 4, 2)


# segment and slot views (one process) ----------------------------------------------------


def test_views_alias_the_segment_and_slots_do_not_overlap(prefix: str) -> None:
    lay = batch_layout(**SMALL)
    with RingSegment.create(lay, prefix=prefix) as ring:
        other = RingSegment.attach(ring.name, lay)  # a second mapping of the same memory
        s0, s1 = ring.slot(0), ring.slot(1)
        assert ring.slot(0) is s0
        for arr in s0.arrays().values():
            arr[...] = -1 if arr.dtype.kind != "u" else 255
        assert all((a == 0).all() for a in s1.arrays().values())
        s1.input_ids[:3] = [11, 12, 13]
        s1.block_tables[2, 1] = 77
        assert other.slot(1).input_ids[:3].tolist() == [11, 12, 13]
        assert other.slot(1)["block_tables"][2, 1] == 77
        other.close()


def test_header_and_prefixes(prefix: str) -> None:
    with RingSegment.create(batch_layout(**SMALL), prefix=prefix) as ring:
        s = ring.slot(1)
        s.set_header(step_id=42, num_tokens=5, num_seqs=2, flags=1)
        assert (s.step_id, s.num_tokens, s.num_seqs, s.flags) == (42, 5, 2, 1)
        p = s.prefixes()
        assert p["input_ids"].shape == (5,) and p["positions"].shape == (5,)
        assert p["cu_seqlens"].shape == (3,) and p["block_tables"].shape == (2, 4)
        assert p["temperature"].shape == (2,) and p["header"].shape == (8,)
        p["input_ids"][:] = 9
        assert s.input_ids[:6].tolist() == [9] * 5 + [0]  # a prefix is a view, not a copy
        assert s.capacity() == (64, 8)
        for bad in ((65, 1), (1, 9), (-1, 0)):
            with pytest.raises(ValueError):
                s.prefixes(*bad)
        with pytest.raises(IndexError):
            ring.slot(2)


def test_segment_is_owner_only_and_fully_allocated(prefix: str) -> None:
    lay = batch_layout(**SMALL)
    with RingSegment.create(lay, prefix=prefix) as ring:
        st_ = os.stat(SHM_DIR / ring.name)
        assert st_.st_mode & 0o777 == 0o600
        assert st_.st_blocks * 512 >= lay.total_size  # pages exist now, not on first touch


def test_attach_with_another_layout_is_refused(prefix: str) -> None:
    with RingSegment.create(batch_layout(**SMALL), prefix=prefix) as ring:
        with pytest.raises(LayoutMismatchError):
            RingSegment.attach(ring.name, batch_layout(**SMALL, max_stop_ids=1))
        with pytest.raises(LayoutMismatchError):
            RingSegment.attach(ring.name, batch_layout(**{**SMALL, "depth": 20}))  # bigger than the file
    with pytest.raises(FileNotFoundError):
        RingSegment.attach(ring.name, batch_layout(**SMALL))


def test_close_and_unlink_are_idempotent_and_owner_only(prefix: str) -> None:
    lay = batch_layout(**SMALL)
    ring = RingSegment.create(lay, prefix=prefix)
    other = RingSegment.attach(ring.name, lay)
    with pytest.raises(RuntimeError, match="creator"):
        other.unlink()
    other.close()
    other.close()
    ring.close()
    ring.close()
    with pytest.raises(RuntimeError, match="closed"):
        ring.slot(0)
    ring.unlink()
    ring.unlink()
    assert not (SHM_DIR / ring.name).exists()


def test_close_with_a_view_still_held_defers_the_unmap(prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    ring = RingSegment.create(batch_layout(**SMALL), prefix=prefix)
    kept = ring.slot(0).input_ids
    kept[:2] = [3, 4]
    with caplog.at_level(logging.WARNING, logger="tandem.shm"):
        ring.close()  # must neither raise BufferError nor unmap under `kept`
    assert "still referenced" in caplog.text
    assert kept[:2].tolist() == [3, 4]
    ring.unlink()
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert ring.name in maps.read_text()
        del kept
        gc.collect()
        assert ring.name not in maps.read_text()


def test_context_manager_unlinks_on_exception(prefix: str) -> None:
    with pytest.raises(ZeroDivisionError), RingSegment.create(batch_layout(**SMALL), prefix=prefix) as ring:
        assert (SHM_DIR / ring.name).exists()
        _ = 1 / 0
    assert not (SHM_DIR / ring.name).exists()


# /dev/shm space --------------------------------------------------------------------------


def test_space_check_names_needed_and_free_bytes(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lay = batch_layout(**SMALL)
    real = os.statvfs(SHM_DIR)
    tiny = os.statvfs_result((4096, 4096, *real[2:3], 1, 1, *real[5:]))  # one free block of 4 KiB
    monkeypatch.setattr(os, "statvfs", lambda path: tiny)
    with pytest.raises(ShmSpaceError) as info:
        RingSegment.create(lay, prefix=prefix)
    assert info.value.needed == lay.total_size and info.value.free == 4096
    assert f"{lay.total_size} bytes" in str(info.value) and "4096 bytes free" in str(info.value)
    assert "--shm-size" in str(info.value)


def test_allocation_failure_is_a_space_error_and_leaves_nothing(
    prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(ShmSpaceError):
        RingSegment.create(batch_layout(**SMALL), prefix=prefix)
    assert list_segments(prefix) == []


# stale cleanup ---------------------------------------------------------------------------


def test_cleanup_removes_only_segments_of_dead_pids(prefix: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    stale = f"{prefix}-{dead}-{secrets.token_hex(4)}"
    bystanders = [f"{prefix}x-{dead}-{secrets.token_hex(4)}", f"{prefix}-{dead}-nothex!!", f"{prefix}-{dead}"]
    for name in [stale, *bystanders]:
        (SHM_DIR / name).write_bytes(b"\0" * 64)
    try:
        with RingSegment.create(batch_layout(**SMALL), prefix=prefix) as live:
            assert list_segments(prefix) == sorted([stale, live.name])
            assert list_segments(prefix, pid=os.getpid()) == [live.name]
            assert cleanup_stale_segments(prefix) == [stale]
            assert list_segments(prefix) == [live.name]
            assert all((SHM_DIR / name).exists() for name in bystanders)
            assert cleanup_stale_segments(prefix) == []
    finally:
        for name in [stale, *bystanders]:
            (SHM_DIR / name).unlink(missing_ok=True)


# real second processes ---------------------------------------------------------------------

SPAWN_SCRIPT = """
import multiprocessing as mp
import sys

from tandem.shm import RingSegment, batch_layout


def worker(handle):
    ring = RingSegment.from_handle(handle)
    s = ring.slot(1)
    assert (s.step_id, s.num_tokens, s.num_seqs) == (41, 3, 1), s["header"]
    p = s.prefixes()
    p["positions"][:] = p["input_ids"] * 10  # the "result"
    ring.close()


if __name__ == "__main__":
    ring = RingSegment.create(batch_layout(64, 8, 4, 2), prefix=sys.argv[1])
    s = ring.slot(1)
    s.set_header(41, 3, 1)
    s.input_ids[:3] = [5, 6, 7]
    p = mp.get_context("spawn").Process(target=worker, args=(ring.handle(),))
    p.start()
    p.join(60)
    assert p.exitcode == 0, p.exitcode
    assert s.positions[:4].tolist() == [50, 60, 70, 0], s.positions[:4]
    ring.close()
    ring.unlink()
    print(ring.name)
"""


def test_spawn_child_attaches_reads_and_writes(prefix: str, tmp_path: Path) -> None:
    # A file, not -c: spawn children re-import the parent's main module.
    script = tmp_path / "spawn_ring.py"
    script.write_text(SPAWN_SCRIPT)
    res = subprocess.run([sys.executable, str(script), prefix], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # The child shares the parent's resource tracker: an attach that registered then
    # unregistered would make the parent's unlink print a KeyError traceback here.
    _assert_quiet(res.stderr)
    name = res.stdout.strip()
    assert name.startswith(f"{prefix}-") and not (SHM_DIR / name).exists()


ATTACH_SCRIPT = """
import json, sys
from tandem.shm import RingSegment
ring = RingSegment.from_handle(json.loads(sys.argv[1]))
s = ring.slot(0)
assert s.step_id == 5 and s.input_ids[:2].tolist() == [1, 2]
s.positions[:2] = s.input_ids[:2] + 100
ring.close()
"""


def test_unrelated_process_attaches_without_stealing_the_segment(prefix: str) -> None:
    with RingSegment.create(batch_layout(**SMALL), prefix=prefix) as ring:
        s = ring.slot(0)
        s.set_header(5, 2, 1)
        s.input_ids[:2] = [1, 2]
        res = _run(ATTACH_SCRIPT, json.dumps(ring.handle()))
        assert res.returncode == 0, res.stderr
        _assert_quiet(res.stderr)
        # Its own tracker would have unlinked the segment when it exited.
        assert (SHM_DIR / ring.name).exists()
        assert s.positions[:2].tolist() == [101, 102]
    assert not (SHM_DIR / ring.name).exists()


def test_owner_unlinks_at_normal_exit_without_calling_unlink(prefix: str) -> None:
    res = _run(
        """
        import sys
        from tandem.shm import RingSegment, batch_layout
        ring = RingSegment.create(batch_layout(64, 8, 4, 2), prefix=sys.argv[1])
        ring.slot(0).input_ids[0] = 1  # views alive at exit must not matter
        print(ring.name)
        """,
        prefix,
    )
    assert res.returncode == 0, res.stderr
    # If atexit did not unlink, the resource tracker would, with a "leaked" warning.
    _assert_quiet(res.stderr)
    assert res.stdout.strip().startswith(prefix) and list_segments(prefix) == []


def test_signal_handler_helper_unlinks(prefix: str) -> None:
    script = """
        import os, signal, sys, time
        from tandem.shm import RingSegment, batch_layout, unlink_owned_segments

        def on_term(signum, frame):
            unlink_owned_segments()
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
        ring = RingSegment.create(batch_layout(64, 8, 4, 2), prefix=sys.argv[1])
        print(ring.name, flush=True)
        time.sleep(60)
        """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), prefix],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        name = proc.stdout.readline().strip()
        assert (SHM_DIR / name).exists()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    _assert_quiet(err)
    assert not (SHM_DIR / name).exists()


def test_unlink_owned_segments_in_process(prefix: str) -> None:
    ring = RingSegment.create(batch_layout(**SMALL), prefix=prefix)
    assert ring.name in unlink_owned_segments()
    assert not (SHM_DIR / ring.name).exists()
    assert unlink_owned_segments() == []
    ring.slot(0).input_ids[0] = 1  # the mapping outlives the name
    ring.close()
    ring.unlink()  # already done: a no-op
    assert np.dtype(ring.layout.field("input_ids").dtype) == np.int64
