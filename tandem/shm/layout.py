"""Where every array of a ring slot lives: field specs, offsets, sizes, and the wire form.

The layout is data, not code, so a field can be added in `batch_layout` without touching
the ring, and the worker rebuilds byte-identical views from the dict the scheduler sends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

FIELD_ALIGN = 64  # a cache line: no two fields share one, and any dtype is aligned
SLOT_ALIGN = 4096  # a page: slots never share a page
RING_HEADER_SIZE = 4096  # first page of the segment: magic + fingerprint, checked on attach
WIRE_VERSION = 1

# Slot header (`header` int64[8]) indices.
HDR_STEP_ID = 0
HDR_NUM_TOKENS = 1
HDR_NUM_SEQS = 2
HDR_FLAGS = 3
HEADER_LEN = 8

# The per-sequence sampling columns of a step, in the order the scheduler packs them and the
# worker's sampler reads them (one name each for a field of `batch_layout` below).
SAMPLING_COLUMNS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "num_logprobs",
)

# What the leading axis of a field counts; `prefixes()` slices by it.
PER_TOKEN = "token"
PER_SEQ = "seq"
_PER_VALUES = (None, PER_TOKEN, PER_SEQ)

_RING_MAGIC = b"TANDEMRG"
_RING_HEADER = struct.Struct("<8sIIQQ32s")  # magic, wire version, depth, slot size, total, fingerprint


class LayoutMismatchError(ValueError):
    """The two sides of a ring disagree on its layout (or the wire form is corrupt)."""


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One typed array per slot. `per` names what the leading axis counts (token or seq),
    `extra` how many rows it has beyond that count (cu_seqlens has num_seqs + 1)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    per: str | None = None
    extra: int = 0

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name.startswith("_"):
            raise ValueError(f"field name {self.name!r} must be an identifier not starting with '_'")
        dt = np.dtype(self.dtype)
        if dt.kind not in "biuf" or not dt.isnative:
            raise ValueError(f"field {self.name!r}: dtype {self.dtype!r} must be a native numeric dtype")
        # Canonical spelling, so "i8" and "int64" give the same fingerprint.
        object.__setattr__(self, "dtype", dt.name)
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"field {self.name!r}: negative dimension in {shape}")
        object.__setattr__(self, "shape", shape)
        if self.per not in _PER_VALUES:
            raise ValueError(f"field {self.name!r}: per must be one of {_PER_VALUES}, got {self.per!r}")
        if self.per is not None and (not shape or not 0 <= self.extra <= shape[0]):
            raise ValueError(f"field {self.name!r}: per={self.per!r} needs a leading axis >= extra")

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.per, self.extra]

    @classmethod
    def from_wire(cls, w: list[Any] | tuple[Any, ...]) -> FieldSpec:
        name, dtype, shape, per, extra = w
        return cls(str(name), str(dtype), tuple(int(d) for d in shape), per, int(extra))


class RingLayout:
    """`depth` identical slots, each holding `fields` at 64-byte aligned offsets.

    Segment = one header page (`RING_HEADER_SIZE`), then the slots, each `slot_size`
    bytes (a multiple of 4096)."""

    def __init__(self, fields: list[FieldSpec] | tuple[FieldSpec, ...], depth: int) -> None:
        if depth < 1:
            raise ValueError(f"ring depth must be >= 1, got {depth}")
        if not fields:
            raise ValueError("a ring layout needs at least one field")
        names = [f.name for f in fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate field names: {dupes}")
        self.fields: tuple[FieldSpec, ...] = tuple(fields)
        self.depth = int(depth)
        offsets: dict[str, int] = {}
        pos = 0
        for f in self.fields:
            offsets[f.name] = pos
            pos = _align(pos + f.nbytes, FIELD_ALIGN)
        self.offsets = offsets
        self.slot_size = max(_align(pos, SLOT_ALIGN), SLOT_ALIGN)
        self.total_size = RING_HEADER_SIZE + self.depth * self.slot_size
        self._by_name = {f.name: f for f in self.fields}
        self.fingerprint = _fingerprint(self._wire_body())

    def field(self, name: str) -> FieldSpec:
        return self._by_name[name]

    def slot_offset(self, k: int) -> int:
        if not 0 <= k < self.depth:
            raise IndexError(f"slot {k} out of range for a ring of depth {self.depth}")
        return RING_HEADER_SIZE + k * self.slot_size

    def _wire_body(self) -> dict[str, Any]:
        return {"version": WIRE_VERSION, "depth": self.depth, "fields": [f.to_wire() for f in self.fields]}

    def to_wire(self) -> dict[str, Any]:
        """Plain dict (str, int, list, None only): goes through msgpack or JSON as is."""
        return {**self._wire_body(), "fingerprint": self.fingerprint}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> RingLayout:
        version = d.get("version")
        if version != WIRE_VERSION:
            raise LayoutMismatchError(f"ring layout wire version {version!r}, expected {WIRE_VERSION}")
        try:
            layout = cls([FieldSpec.from_wire(w) for w in d["fields"]], int(d["depth"]))
        except (KeyError, TypeError, ValueError) as e:
            raise LayoutMismatchError(f"malformed ring layout on the wire: {e!r}") from e
        sent = d.get("fingerprint")
        if sent is not None and sent != layout.fingerprint:
            raise LayoutMismatchError(
                f"ring layout fingerprint mismatch: sender {sent}, rebuilt {layout.fingerprint}"
            )
        return layout

    def ring_header(self) -> bytes:
        return _RING_HEADER.pack(
            _RING_MAGIC, WIRE_VERSION, self.depth, self.slot_size, self.total_size, self.fingerprint.encode()
        )

    def check_ring_header(self, buf: memoryview | bytes, name: str = "?") -> None:
        """Raise LayoutMismatchError unless `buf` starts with this layout's ring header."""
        magic, version, depth, slot_size, total, fp = _RING_HEADER.unpack_from(buf, 0)
        if magic != _RING_MAGIC:
            raise LayoutMismatchError(f"shm segment {name!r} is not a tandem ring (magic {magic!r})")
        if (version, depth, slot_size, total, fp.decode(errors="replace")) != (
            WIRE_VERSION,
            self.depth,
            self.slot_size,
            self.total_size,
            self.fingerprint,
        ):
            raise LayoutMismatchError(
                f"shm segment {name!r} was created with another layout: "
                f"depth={depth} slot_size={slot_size} fingerprint={fp.decode(errors='replace')}, "
                f"expected depth={self.depth} slot_size={self.slot_size} fingerprint={self.fingerprint}"
            )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RingLayout) and self.to_wire() == other.to_wire()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return (
            f"RingLayout(depth={self.depth}, fields={len(self.fields)}, slot_size={self.slot_size}, "
            f"total_size={self.total_size}, fingerprint={self.fingerprint})"
        )


def _fingerprint(body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def batch_layout(
    max_num_batched_tokens: int,
    max_num_seqs: int,
    max_blocks_per_seq: int,
    depth: int,
    max_stop_ids: int = 0,
) -> RingLayout:
    """The step batch the scheduler hands the GPU worker. `max_stop_ids` > 0 adds a
    per-sequence `stop_ids` [S, max_stop_ids] array (padded with -1 by the writer) for
    device-side token suppression; 0 leaves it out."""
    for label, v in (
        ("max_num_batched_tokens", max_num_batched_tokens),
        ("max_num_seqs", max_num_seqs),
        ("max_blocks_per_seq", max_blocks_per_seq),
    ):
        if v < 1:
            raise ValueError(f"{label} must be >= 1, got {v}")
    if max_stop_ids < 0:
        raise ValueError(f"max_stop_ids must be >= 0, got {max_stop_ids}")
    t, s = max_num_batched_tokens, max_num_seqs

    def tok(name: str, dtype: str) -> FieldSpec:
        return FieldSpec(name, dtype, (t,), PER_TOKEN)

    def seq(name: str, dtype: str, *rest: int, extra: int = 0) -> FieldSpec:
        return FieldSpec(name, dtype, (s + extra, *rest), PER_SEQ, extra)

    fields = [
        FieldSpec("header", "int64", (HEADER_LEN,)),
        tok("input_ids", "int64"),
        tok("positions", "int64"),
        seq("seq_slots", "int32"),
        seq("query_lens", "int32"),
        seq("context_lens", "int32"),
        seq("cu_seqlens", "int32", extra=1),
        seq("block_tables", "int32", max_blocks_per_seq),
        seq("sample_mask", "uint8"),
        # Penalties tell prompt tokens from generated ones by position (worker-side state).
        seq("prompt_lens", "int32"),
        seq("temperature", "float32"),
        seq("top_k", "int32"),
        seq("top_p", "float32"),
        seq("min_p", "float32"),
        seq("repetition_penalty", "float32"),
        seq("presence_penalty", "float32"),
        seq("frequency_penalty", "float32"),
        seq("seed", "int64"),
        seq("sample_step", "int64"),
        seq("num_logprobs", "int32"),
        seq("embed", "uint8"),  # 1: pool this sequence's hidden states instead of sampling
        seq("want_logits", "uint8"),
        # Structured output: the grammar a row follows (0: none; GrammarSpec sent the text) and
        # its occupant's identity (sequence and epoch), so the worker's matcher restarts with it.
        seq("grammar_id", "int32"),
        seq("grammar_key", "int64"),
        # Echo: top-n of each prompt position's logprobs (-1: none), and per token the next prompt
        # token, whose logprob the position returns (-1: none; written only when a row asks).
        seq("prompt_logprobs", "int32"),
        tok("target_ids", "int64"),
    ]
    if max_stop_ids:
        fields.append(seq("stop_ids", "int32", max_stop_ids))
    return RingLayout(fields, depth)
