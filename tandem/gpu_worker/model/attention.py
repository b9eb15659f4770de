"""Paged attention over a mixed batch of prefill chunks and decode tokens.

The batch is flat: the tokens of every sequence back to back, ``cu_seqlens`` marking where
each sequence's new tokens start. Every sequence's keys and values live in the paged pool;
this step's new ones are written there first, then read back through the block table, so a
prefill chunk that continues a cached prefix and a decode step take the same path.

Metadata is built once per step on the host, in numpy, from the slot's arrays, and reaches the
device in the step's single upload (see ``gpu_worker/staging.py``): ``AttentionPlan.make`` adds
its arrays to the step's dict and ``bind`` turns the uploaded tensors into ``AttentionMetadata``.

Decode rows read only the blocks they own, one of two ways:
- chunks (sliding-window reads, and a CPU without numba or a GPU without Triton): decode
  sequences are grouped by block count (powers of two); each group's blocks are gathered whole
  into a reused workspace and attended with two batched matmuls, GQA-aware (each KV head against
  its group of query heads). A step reads at most twice the visible keys, never
  ``batch x max_ctx``, in a number of groups that does not grow with the batch.
- paged: one kernel reads the block table itself, on CUDA with Triton
  (``model/triton_attention.py``; its shapes stay fixed, so CUDA graphs capture it) and on the CPU
  with numba (``model/cpu_kernels.py``; no gather, and a bf16 cache read as it is stored).
Prefill chunks are few and long: each goes through SDPA on its own gathered context.

Sliding-window layers (Mistral, Gemma 3) attend to the last ``window`` keys only, the query's own
included. Every block stays in the pool (none is freed when it leaves the window), so a sliding
and a global layer share the block tables and the slot mapping; what differs is what they read.
When a step has a sequence longer than the window, ``make`` plans a second set of reads for the
sliding layers once per step (``AttentionMetadata.sliding``; otherwise both kinds use the same):
decode rows gather only the blocks that overlap their window and mask the keys before it in the
first of them; prefill chunks gather the context from the first key their first query sees and
mask per query row. Sliding reads always take the chunk path, never the paged kernel, so models
with sliding layers run decode eagerly on a GPU (no CUDA graphs).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tandem.gpu_worker.kv_cache import KVCache

log = logging.getLogger(__name__)

# A decode group's gather is split so one chunk stays under this many keys (bounds the workspace).
DEFAULT_MAX_CHUNK_KEYS = 1 << 16


class PagedKernel(enum.Enum):
    """The kernel that reads decode rows' block tables itself (None in a plan: the chunk path)."""

    TRITON = "triton"  # CUDA (or Triton's interpreter)
    NUMBA = "numba"  # the CPU


@dataclass
class PrefillSeq:
    token_start: int
    token_end: int
    kv_slots: torch.Tensor  # (context_len,) flat slot ids of the whole context
    mask: torch.Tensor | None  # (q_len, context_len) bool, None when plain causal suffices


@dataclass
class DecodeChunk:
    """Decode sequences of about the same block count `width`, attended in one pair of matmuls."""

    rows: torch.Tensor | None  # (n,) token rows; None when they are rows [0, n) in order
    block_ids: torch.Tensor  # (n * width,) blocks to gather, sequence-major (unowned ones are 0)
    hidden: torch.Tensor | None  # (n, 1, width * block_size) True where a key is not visible
    n: int
    width: int


@dataclass
class PagedDecode:
    """Inputs of the paged decode kernel: it reads block tables and lengths on the device."""

    rows: torch.Tensor | None  # (n,) token rows; None when they are rows [0, n) in order
    block_tables: torch.Tensor  # (n, max_blocks) int32
    context_lens: torch.Tensor  # (n,) int32
    n: int
    kernel: PagedKernel = PagedKernel.TRITON


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) where each new token's K/V is written
    decode_chunks: list[DecodeChunk]
    paged: PagedDecode | None
    prefills: list[PrefillSeq]
    num_tokens: int
    block_size: int
    # The window this step was planned for (None: none), and the reads of its sliding layers when
    # some sequence is longer than the window (None: they read what global layers read).
    window: int | None = None
    sliding: AttentionMetadata | None = None

    def for_layer(self, sliding: bool) -> AttentionMetadata:
        return self.sliding or self if sliding else self

    @classmethod
    def build(
        cls,
        positions: torch.Tensor | np.ndarray,
        query_lens: list[int] | np.ndarray,
        context_lens: list[int] | np.ndarray,
        block_tables: torch.Tensor | np.ndarray,
        block_size: int,
        device: torch.device | str = "cpu",
        paged_kernel: PagedKernel | None = None,
        max_chunk_keys: int = DEFAULT_MAX_CHUNK_KEYS,
        sliding_window: int | None = None,
    ) -> AttentionMetadata:
        """Plan and upload in one go (tests, benchmarks); the worker plans into its staging."""
        arrays: dict[str, np.ndarray] = {}
        plan = AttentionPlan.make(
            arrays,
            np.asarray(positions),
            np.asarray(query_lens),
            np.asarray(context_lens),
            np.asarray(block_tables),
            block_size,
            paged_kernel=paged_kernel,
            max_chunk_keys=max_chunk_keys,
            sliding_window=sliding_window,
        )
        return plan.bind({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in arrays.items()})


@dataclass
class _ChunkPlan:
    name: str
    n: int
    width: int
    in_order: bool
    masked: bool


@dataclass
class _PrefillPlan:
    name: str
    start: int
    end: int
    masked: bool


@dataclass
class AttentionPlan:
    """What `make` decided on the host: the names of its arrays in the step's dict, and sizes."""

    num_tokens: int
    block_size: int
    chunks: list[_ChunkPlan]
    prefills: list[_PrefillPlan]
    paged_n: int = 0
    paged_in_order: bool = False
    paged_kernel: PagedKernel | None = None
    prefix: str = ""  # of this plan's array names ("swa_" for the sliding reads)
    window: int | None = None
    sliding: AttentionPlan | None = None

    @classmethod
    def make(
        cls,
        arrays: dict[str, np.ndarray],
        positions: np.ndarray,
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        block_tables: np.ndarray,
        block_size: int,
        paged_kernel: PagedKernel | None = None,
        max_chunk_keys: int = DEFAULT_MAX_CHUNK_KEYS,
        sliding_window: int | None = None,
    ) -> AttentionPlan:
        """Add this step's attention arrays to `arrays` (numpy, host) and return the plan.

        ``sliding_window``: the model's (None if no layer slides); sliding reads are planned
        too when some sequence's context is longer than it.
        """
        qlens = query_lens.astype(np.int64, copy=False)
        ctx = context_lens.astype(np.int64, copy=False)
        num_seqs = len(qlens)
        bt = block_tables[:num_seqs].astype(np.int64, copy=False)
        pos = positions.astype(np.int64, copy=False)
        starts = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(qlens, out=starts[1:])
        seq_of_token = np.repeat(np.arange(num_seqs), qlens)
        arrays["slot_mapping"] = bt[seq_of_token, pos // block_size] * block_size + pos % block_size

        plan = cls(len(pos), block_size, [], [], window=sliding_window)
        plan._plan_reads(arrays, qlens, ctx, bt, starts, paged_kernel, max_chunk_keys)
        if sliding_window is not None and bool((ctx > sliding_window).any()):
            plan.sliding = cls(len(pos), block_size, [], [], prefix="swa_", window=sliding_window)
            # The paged kernel reads whole tables from key 0: sliding reads take the chunk path.
            plan.sliding._plan_reads(arrays, qlens, ctx, bt, starts, None, max_chunk_keys)
        return plan

    def _plan_reads(
        self,
        arrays: dict[str, np.ndarray],
        qlens: np.ndarray,
        ctx: np.ndarray,
        bt: np.ndarray,
        starts: np.ndarray,
        paged_kernel: PagedKernel | None,
        max_chunk_keys: int,
    ) -> None:
        decode = np.flatnonzero(qlens == 1)
        if len(decode):
            in_order = len(decode) == len(qlens)  # a pure decode step: token row i is sequence i
            if paged_kernel is not None:
                self.paged_kernel = paged_kernel
                self._plan_paged(arrays, decode, starts, ctx, bt, in_order)
            else:
                self._plan_chunks(arrays, decode, starts, ctx, bt, in_order, max_chunk_keys)
        for i in np.flatnonzero(qlens != 1):
            self._plan_prefill(arrays, int(starts[i]), int(qlens[i]), int(ctx[i]), bt[i])

    def _first_key(self, ctx: np.ndarray) -> np.ndarray:
        """The first key the last query of each context sees (0 for global reads)."""
        if not self.prefix:
            return np.zeros_like(ctx)
        assert self.window is not None
        return np.maximum(ctx - self.window, 0)

    def _plan_paged(
        self,
        arrays: dict[str, np.ndarray],
        decode: np.ndarray,
        starts: np.ndarray,
        ctx: np.ndarray,
        bt: np.ndarray,
        in_order: bool,
    ) -> None:
        self.paged_n, self.paged_in_order = len(decode), in_order
        if not in_order:
            arrays["paged_rows"] = starts[decode]
        arrays["paged_block_tables"] = bt[decode].astype(np.int32)
        arrays["paged_context_lens"] = ctx[decode].astype(np.int32)

    def _plan_chunks(
        self,
        arrays: dict[str, np.ndarray],
        decode: np.ndarray,
        starts: np.ndarray,
        ctx: np.ndarray,
        bt: np.ndarray,
        in_order: bool,
        max_chunk_keys: int,
    ) -> None:
        bs = self.block_size
        lens = ctx[decode]
        nblk = (lens + bs - 1) // bs - self._first_key(lens) // bs
        # Grouped by the next power of two of the block count: at most twice the visible keys
        # are read, in at most log2(max blocks) groups whatever the batch size.
        group = np.ceil(np.log2(np.maximum(nblk, 1))).astype(np.int64)
        order = np.argsort(group, kind="stable")
        bounds = np.flatnonzero(np.diff(group[order])) + 1
        for members in np.split(order, bounds):
            width = int(nblk[members].max())
            per_chunk = max(1, max_chunk_keys // (width * bs))
            for lo in range(0, len(members), per_chunk):
                part = members[lo : lo + per_chunk]
                self._add_chunk(arrays, decode[part], starts, ctx, bt, width, in_order and lo == 0)

    def _add_chunk(
        self,
        arrays: dict[str, np.ndarray],
        seqs: np.ndarray,
        starts: np.ndarray,
        ctx: np.ndarray,
        bt: np.ndarray,
        width: int,
        may_be_in_order: bool,
    ) -> None:
        bs = self.block_size
        name = f"{self.prefix}dchunk{len(self.chunks)}"
        lens = ctx[seqs]
        lo = self._first_key(lens)
        first = lo // bs  # a sliding read starts at the block holding the window's first key
        cols = first[:, None] + np.arange(width)[None, :]
        owned = cols < ((lens + bs - 1) // bs)[:, None]
        # Columns past a sequence's own blocks may hold stale ids of an earlier occupant: block 0
        # is read there instead (masked out, and finite: the pool starts zeroed).
        table = np.take_along_axis(bt[seqs], np.minimum(cols, bt.shape[1] - 1), axis=1)
        arrays[f"{name}_blocks"] = np.where(owned, table, 0).reshape(-1)
        in_order = may_be_in_order and bool(np.array_equal(seqs, np.arange(len(seqs))))
        if not in_order:
            arrays[f"{name}_rows"] = starts[seqs]
        # Visible keys of each row, relative to the first gathered one: [lo - first * bs, lens - first * bs).
        begin, end = lo - first * bs, lens - first * bs
        masked = bool((end != width * bs).any() or begin.any())
        if masked:
            keys = np.arange(width * bs)[None, :]
            arrays[f"{name}_hidden"] = ((keys >= end[:, None]) | (keys < begin[:, None]))[:, None, :]
        self.chunks.append(_ChunkPlan(name, len(seqs), width, in_order, masked))

    def _plan_prefill(
        self, arrays: dict[str, np.ndarray], start: int, q: int, ctx: int, table: np.ndarray
    ) -> None:
        bs = self.block_size
        name = f"{self.prefix}prefill{len(self.prefills)}"
        # Query r sits at position ctx - q + r; a sliding read starts at the first query's first key.
        qpos = np.arange(q)[:, None] + (ctx - q)
        lo = int(self._first_key(np.array([ctx - q + 1]))[0])
        j = np.arange(lo, ctx)
        arrays[f"{name}_slots"] = table[j // bs] * bs + j % bs
        windowed = bool(self.prefix) and ctx > (self.window or 0)
        masked = ctx != q or windowed
        if masked:  # a chunk after a cached prefix: query r sees keys up to ctx - q + r
            visible = j[None, :] <= qpos
            if windowed:
                assert self.window is not None
                visible &= j[None, :] > qpos - self.window
            arrays[f"{name}_mask"] = visible
        self.prefills.append(_PrefillPlan(name, start, start + q, masked))

    def bind(self, dev: dict[str, torch.Tensor]) -> AttentionMetadata:
        """The metadata over the uploaded arrays (`dev` holds a tensor per name `make` added)."""
        meta = self._bind(dev)
        meta.window = self.window
        meta.sliding = None if self.sliding is None else self.sliding._bind(dev)
        return meta

    def _bind(self, dev: dict[str, torch.Tensor]) -> AttentionMetadata:
        chunks = [
            DecodeChunk(
                rows=None if c.in_order else dev[f"{c.name}_rows"],
                block_ids=dev[f"{c.name}_blocks"],
                hidden=dev[f"{c.name}_hidden"] if c.masked else None,
                n=c.n,
                width=c.width,
            )
            for c in self.chunks
        ]
        paged = None
        if self.paged_n:
            assert self.paged_kernel is not None
            paged = PagedDecode(
                rows=None if self.paged_in_order else dev["paged_rows"],
                block_tables=dev["paged_block_tables"],
                context_lens=dev["paged_context_lens"],
                n=self.paged_n,
                kernel=self.paged_kernel,
            )
        prefills = [
            PrefillSeq(p.start, p.end, dev[f"{p.name}_slots"], dev[f"{p.name}_mask"] if p.masked else None)
            for p in self.prefills
        ]
        return AttentionMetadata(
            dev["slot_mapping"], chunks, paged, prefills, self.num_tokens, self.block_size
        )


def write_kv(kv_layer: torch.Tensor, new_kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys and values, `new_kv` (T, 2 * Hkv, D), with one indexed copy."""
    two, hkv, slots, d = kv_layer.shape
    kv_layer.view(two * hkv, slots, d).index_copy_(1, slot_mapping, new_kv.transpose(0, 1).to(kv_layer.dtype))


def paged_attention(
    q: torch.Tensor,  # (T, H, D), any row stride
    kv: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of every query row over its sequence's cached keys (this step's already written)."""
    kv_layer = kv.layers[layer]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for chunk in meta.decode_chunks:
        _decode_chunk(q, kv, kv_layer, chunk, scale, out)
    if meta.paged is not None:
        _paged_decode(q, kv_layer, meta.paged, kv.block_size, scale, out)
    for p in meta.prefills:
        _prefill(q, kv_layer, p, scale, out)
    return out


def _decode_chunk(
    q: torch.Tensor, kv: KVCache, kv_layer: torch.Tensor, c: DecodeChunk, scale: float, out: torch.Tensor
) -> None:
    two, hkv, slots, d = kv_layer.shape
    heads = q.shape[1]
    group = heads // hkv
    bs = kv.block_size
    keys = c.width * bs
    blocks = kv_layer.view(two * hkv, slots // bs, bs * d)
    gathered = kv.workspace(two * hkv * c.n * keys * d).view(two * hkv, c.n * c.width, bs * d)
    torch.index_select(blocks, 1, c.block_ids, out=gathered)
    k, v = gathered.view(two, hkv * c.n, keys, d).unbind(0)  # (Hkv * n, keys, D), head-major
    if q.device.type == "cpu":
        k, v = k.to(q.dtype), v.to(q.dtype)  # CPU bmm in bf16 is several times slower than fp32
    qd = q[: c.n] if c.rows is None else q.index_select(0, c.rows)
    # (n, Hkv, G, D) -> (Hkv * n, G, D): each KV head meets its group of query heads in one matmul.
    qd = (qd.reshape(c.n, hkv, group, d) * scale).transpose(0, 1).reshape(hkv * c.n, group, d)
    scores = torch.bmm(qd.to(k.dtype), k.transpose(1, 2)).float()  # (Hkv * n, G, keys)
    if c.hidden is not None:
        scores.view(hkv, c.n, group, keys).masked_fill_(c.hidden[None], float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    o = torch.bmm(probs, v).view(hkv, c.n, group, d).transpose(0, 1).reshape(c.n, heads, d)
    if c.rows is None:
        out[: c.n] = o
    else:
        out.index_copy_(0, c.rows, o.to(out.dtype))


def _paged_decode(
    q: torch.Tensor, kv_layer: torch.Tensor, p: PagedDecode, block_size: int, scale: float, out: torch.Tensor
) -> None:
    if p.kernel is PagedKernel.NUMBA:
        from tandem.gpu_worker.model import cpu_kernels

        rows = np.arange(p.n) if p.rows is None else p.rows.numpy()
        tables, lens = p.block_tables, p.context_lens
        cpu_kernels.decode_attention(q, kv_layer, rows, tables, lens, block_size, scale, out)
        return
    from tandem.gpu_worker.model.triton_attention import paged_decode_attention

    qd = q[: p.n] if p.rows is None else q.index_select(0, p.rows)
    o = paged_decode_attention(qd, kv_layer, p.block_tables, p.context_lens, block_size, scale)
    if p.rows is None:
        out[: p.n] = o
    else:
        out.index_copy_(0, p.rows, o.to(out.dtype))


def _prefill(q: torch.Tensor, kv_layer: torch.Tensor, p: PrefillSeq, scale: float, out: torch.Tensor) -> None:
    two, hkv, slots, d = kv_layer.shape
    ctx = kv_layer.view(two * hkv, slots, d).index_select(1, p.kv_slots).to(q.dtype)  # (2 * Hkv, ctx, D)
    kp, vp = ctx[:hkv].unsqueeze(0), ctx[hkv:].unsqueeze(0)
    qp = q[p.token_start : p.token_end].transpose(0, 1).unsqueeze(0)  # (1, H, q, D)
    op = F.scaled_dot_product_attention(
        qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=q.shape[1] != hkv
    )
    out[p.token_start : p.token_end] = op.squeeze(0).transpose(0, 1)
