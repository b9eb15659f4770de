"""Numpy views of one ring slot. No copies: every array aliases the shared segment."""

from __future__ import annotations

import logging

import numpy as np

from tandem.shm.layout import (
    HDR_FLAGS,
    HDR_NUM_SEQS,
    HDR_NUM_TOKENS,
    HDR_STEP_ID,
    PER_SEQ,
    PER_TOKEN,
    RingLayout,
)

logger = logging.getLogger(__name__)


class SlotView:
    """Arrays of slot `index`: `view.input_ids` or `view["input_ids"]`.

    Owned by the ring, which drops the arrays on close (a live numpy view keeps the mmap
    exported, and closing it would then fail). Who may write a slot is decided by the
    ZMQ messages, never by anything in here."""

    __slots__ = ("_arrays", "_cap", "_per", "index")

    def __init__(self, index: int, buf: memoryview, layout: RingLayout) -> None:
        self.index = index
        base = layout.slot_offset(index)
        self._arrays: dict[str, np.ndarray] = {}
        self._per: dict[str, tuple[str | None, int]] = {}
        # frombuffer, not np.ndarray(buffer=...): the latter keeps only a reference to the
        # mmap, not a buffer export, so closing the mmap would unmap live arrays (segfault).
        # With an export, mmap.close() raises BufferError instead.
        raw = np.frombuffer(buf, np.uint8, layout.slot_size, base)
        for f in layout.fields:
            if hasattr(type(self), f.name):
                raise ValueError(f"field name {f.name!r} shadows a SlotView attribute")
            off = layout.offsets[f.name]
            self._arrays[f.name] = raw[off : off + f.nbytes].view(f.dtype).reshape(f.shape)
            self._per[f.name] = (f.per, f.extra)
        caps: dict[str, list[int]] = {PER_TOKEN: [], PER_SEQ: []}
        for f in layout.fields:
            if f.per is not None:
                caps[f.per].append(f.shape[0] - f.extra)
        self._cap = (min(caps[PER_TOKEN], default=-1), min(caps[PER_SEQ], default=-1))

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._arrays[name]
        except KeyError:
            self._check_open()
            raise

    def __getattr__(self, name: str) -> np.ndarray:
        # Only reached for names that are not real attributes, i.e. field names.
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._arrays[name]
        except KeyError:
            self._check_open()
            raise AttributeError(f"slot has no field {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._arrays

    @property
    def names(self) -> list[str]:
        return list(self._arrays)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every field, full size. The dict is new; the arrays are the shared views."""
        self._check_open()
        return dict(self._arrays)

    def _check_open(self) -> None:
        if not self._arrays:
            raise RuntimeError(f"slot {self.index} belongs to a closed ring")

    def _release(self) -> None:
        self._arrays.clear()

    # header ----------------------------------------------------------------------------

    def _hdr(self, i: int) -> int:
        return int(self["header"][i])

    def _set_hdr(self, i: int, v: int) -> None:
        self["header"][i] = v

    @property
    def step_id(self) -> int:
        return self._hdr(HDR_STEP_ID)

    @step_id.setter
    def step_id(self, v: int) -> None:
        self._set_hdr(HDR_STEP_ID, v)

    @property
    def num_tokens(self) -> int:
        return self._hdr(HDR_NUM_TOKENS)

    @num_tokens.setter
    def num_tokens(self, v: int) -> None:
        self._set_hdr(HDR_NUM_TOKENS, v)

    @property
    def num_seqs(self) -> int:
        return self._hdr(HDR_NUM_SEQS)

    @num_seqs.setter
    def num_seqs(self, v: int) -> None:
        self._set_hdr(HDR_NUM_SEQS, v)

    @property
    def flags(self) -> int:
        return self._hdr(HDR_FLAGS)

    @flags.setter
    def flags(self, v: int) -> None:
        self._set_hdr(HDR_FLAGS, v)

    def set_header(self, step_id: int, num_tokens: int, num_seqs: int, flags: int = 0) -> None:
        self._check_sizes(num_tokens, num_seqs)
        hdr = self["header"]
        hdr[HDR_STEP_ID] = step_id
        hdr[HDR_NUM_TOKENS] = num_tokens
        hdr[HDR_NUM_SEQS] = num_seqs
        hdr[HDR_FLAGS] = flags

    # prefixes --------------------------------------------------------------------------

    def capacity(self) -> tuple[int, int]:
        """(max tokens, max seqs) this slot can carry; -1 where no field counts that axis."""
        return self._cap

    def _check_sizes(self, num_tokens: int, num_seqs: int) -> None:
        max_t, max_s = self._cap
        if num_tokens < 0 or (max_t >= 0 and num_tokens > max_t):
            raise ValueError(f"num_tokens={num_tokens} outside [0, {max_t}] for slot {self.index}")
        if num_seqs < 0 or (max_s >= 0 and num_seqs > max_s):
            raise ValueError(f"num_seqs={num_seqs} outside [0, {max_s}] for slot {self.index}")

    def prefixes(self, num_tokens: int | None = None, num_seqs: int | None = None) -> dict[str, np.ndarray]:
        """Each field cut to the rows in use: per-token fields `[:num_tokens]`, per-seq
        fields `[:num_seqs + extra]`, others whole. Defaults come from the header.
        Sizes are checked, so a corrupt doorbell cannot index past a field."""
        if num_tokens is None:
            num_tokens = self.num_tokens
        if num_seqs is None:
            num_seqs = self.num_seqs
        self._check_sizes(num_tokens, num_seqs)
        out = {}
        for name, arr in self._arrays.items():
            per, extra = self._per[name]
            if per == PER_TOKEN:
                out[name] = arr[: num_tokens + extra]
            elif per == PER_SEQ:
                out[name] = arr[: num_seqs + extra]
            else:
                out[name] = arr
        return out

    def __repr__(self) -> str:
        state = "closed" if not self._arrays else f"{len(self._arrays)} fields"
        return f"SlotView(index={self.index}, {state})"
