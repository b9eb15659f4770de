"""The step ring: one shm segment of `depth` slots, created and unlinked by the scheduler,
attached by the GPU worker. Memory only: slot ownership travels in ZMQ messages."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from multiprocessing import resource_tracker, shared_memory
from types import TracebackType
from typing import Any

from tandem.shm.layout import RING_HEADER_SIZE, LayoutMismatchError, RingLayout
from tandem.shm.segment import (
    attach_untracked,
    check_prefix,
    check_shm_space,
    ensure_owner_only,
    preallocate,
    segment_name,
)
from tandem.shm.slot import SlotView

logger = logging.getLogger(__name__)

# Segments this process created and has not unlinked yet; read by the exit paths.
_OWNED: dict[str, RingSegment] = {}


def unlink_owned_segments() -> list[str]:
    """Unlink every segment this process created and still owns; return their names.

    Meant for signal handlers and last-ditch paths: it only removes the names (mappings
    stay valid for whoever still uses them) and does not log."""
    return [seg.name for seg in list(_OWNED.values()) if seg._unlink_quiet()]


def _unlink_at_exit() -> None:
    names = unlink_owned_segments()
    if names:
        logger.debug("unlinked shm segment(s) at exit: %s", names)


atexit.register(_unlink_at_exit)


class RingSegment:
    """A shared-memory ring. Build with `create` (owner) or `attach` / `from_handle`."""

    def __init__(self, shm: shared_memory.SharedMemory, layout: RingLayout, owner: bool) -> None:
        self._shm = shm
        self.layout = layout
        self.name: str = shm.name
        self.owner = owner
        self._owner_pid = os.getpid() if owner else -1
        self._slots: list[SlotView | None] = [None] * layout.depth
        self._closed = False
        self._unlinked = False

    @classmethod
    def create(cls, layout: RingLayout, prefix: str = "tandem") -> RingSegment:
        """Create, zero and own a new segment named `{prefix}-{pid}-{hex}` (mode 0600).

        Raises ShmSpaceError when /dev/shm cannot hold it. The segment is unlinked by
        `unlink()`, the context manager, `unlink_owned_segments()` or at interpreter exit."""
        check_prefix(prefix)
        size = layout.total_size
        check_shm_space(size)
        shm = None
        for _ in range(3):  # a 32-bit suffix clash is unlikely; a retry makes it harmless
            try:
                shm = shared_memory.SharedMemory(name=segment_name(prefix), create=True, size=size)
                break
            except FileExistsError:
                continue
        if shm is None:
            raise FileExistsError(f"could not find a free shm name with prefix {prefix!r}")
        try:
            ensure_owner_only(shm)
            preallocate(shm, size)
            header = layout.ring_header()
            shm.buf[: len(header)] = header
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        seg = cls(shm, layout, owner=True)
        _OWNED[seg.name] = seg
        logger.info(
            "created shm ring %s: %d slots x %d bytes (%d bytes)",
            seg.name,
            layout.depth,
            layout.slot_size,
            size,
        )
        return seg

    @classmethod
    def attach(cls, name: str, layout: RingLayout) -> RingSegment:
        """Map an existing ring without tracking it (only the creator unlinks).

        Raises FileNotFoundError if there is no such segment and LayoutMismatchError if it
        was created with another layout."""
        shm = attach_untracked(name)
        try:
            if shm.size < layout.total_size:
                raise LayoutMismatchError(
                    f"shm segment {name!r} has {shm.size} bytes, the layout needs {layout.total_size}"
                )
            # A copy: a memoryview slice caught in the traceback would block shm.close().
            layout.check_ring_header(bytes(shm.buf[:RING_HEADER_SIZE]), name)
        except BaseException:
            shm.close()
            raise
        logger.debug("attached shm ring %s (%d slots)", name, layout.depth)
        return cls(shm, layout, owner=False)

    def handle(self) -> dict[str, Any]:
        """What the worker needs to attach: goes in the startup message as is."""
        return {"name": self.name, "layout": self.layout.to_wire()}

    @classmethod
    def from_handle(cls, handle: dict[str, Any]) -> RingSegment:
        return cls.attach(handle["name"], RingLayout.from_wire(handle["layout"]))

    @property
    def depth(self) -> int:
        return self.layout.depth

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return self.layout.depth

    def slot(self, k: int) -> SlotView:
        """Views of slot k (cached; the same object every call)."""
        if self._closed:
            raise RuntimeError(f"shm ring {self.name} is closed")
        self.layout.slot_offset(k)  # bounds check with a clear message
        view = self._slots[k]
        if view is None:
            view = self._slots[k] = SlotView(k, self._shm.buf, self.layout)
        return view

    def close(self) -> None:
        """Drop the slot views and unmap. Idempotent. Does not unlink."""
        if self._closed:
            return
        self._closed = True
        for view in self._slots:
            if view is not None:
                view._release()
        self._slots = [None] * self.layout.depth
        try:
            self._shm.close()
        except BufferError:
            # Arrays taken out of a SlotView are still alive. Unmapping under them would
            # crash, so leave the mapping to them: it goes when the last one does.
            logger.warning(
                "shm ring %s closed while numpy views of it are still referenced; "
                "the mapping stays until they are dropped",
                self.name,
            )
            self._shm._buf = None  # type: ignore[attr-defined]
            self._shm._mmap = None  # type: ignore[attr-defined]
            self._shm.close()  # now only closes the fd

    def unlink(self) -> None:
        """Remove the name from /dev/shm (owner only; idempotent). Mappings stay valid."""
        if not self.owner:
            raise RuntimeError(f"shm ring {self.name} was attached, not created: only its creator unlinks it")
        if self._unlink_quiet():
            logger.info("unlinked shm ring %s", self.name)

    def _unlink_quiet(self) -> bool:
        # The pid check keeps a forked child (which inherits _OWNED and atexit) from
        # unlinking its parent's ring.
        if self._unlinked or not self.owner or os.getpid() != self._owner_pid:
            return False
        self._unlinked = True
        _OWNED.pop(self.name, None)
        try:
            self._shm.unlink()
        except FileNotFoundError:
            # Someone removed it (a stale-segment sweep, a human); drop our tracker entry so
            # the tracker doesn't try again and warn at exit.
            with contextlib.suppress(Exception):
                resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]
            return False
        return True

    def __enter__(self) -> RingSegment:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.close()
        finally:
            if self.owner:
                self.unlink()

    def __del__(self) -> None:
        # Release our views before SharedMemory.__del__ closes the mmap under them.
        with contextlib.suppress(Exception):
            if not self._closed:
                self.close()

    def __repr__(self) -> str:
        role = "owner" if self.owner else "attached"
        state = "closed" if self._closed else "open"
        size = self.layout.total_size
        return f"RingSegment({self.name!r}, {role}, {state}, depth={self.depth}, size={size})"
