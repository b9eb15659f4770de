"""Paged decode attention as a numba kernel (see cpu_kernels, which wraps it).

Module-level functions so numba caches their machine code on disk; imported only where they run
(numba's import costs a third of a second).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from tandem.gpu_worker.model import numba_vec as vec


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint the CPU to bring element ``index`` of C-contiguous ``arr`` (flat) into cache: a
    sequence's blocks are scattered through the pool, so the hardware prefetcher loses the
    stream at every block."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        vec.prefetch(builder, builder.gep(ary.data, [args[1]]))
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    """The fp32 of a bf16 held as 16 bits: numba has no scalar bitcast, and converting a block
    into an fp32 scratch first cost a store and a load an element."""

    def codegen(context, builder, sig, args):
        return vec.widen_bf16(builder, args[0])

    return types.float32(bits), codegen


def as_f32(x):
    """A cache element as fp32: bf16 stored as its raw 16 bits, or fp32 (numba picks the overload)."""
    raise NotImplementedError("numba-only")


@overload(as_f32, inline="always")
def _as_f32(x):
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        return lambda x: _bf16_bits_to_f32(x)
    return lambda x: x


@njit(fastmath=True, inline="always")
def _prefetch_row(src, row):
    step = 64 // src.itemsize  # one hint a cache line
    d = src.shape[1]
    for e in range(0, d, step):
        prefetch(src, row * d + e)


@njit(fastmath=True, inline="always")
def _prefetch_block(src, start, bs):
    """Rows ``start .. start + bs`` hinted a row at a time."""
    for t in range(bs):
        _prefetch_row(src, start + t)


# 2^f on [0, 1), degree 6, fitted to relative error (1e-7 evaluated in fp32: fp32's own epsilon).
_EXP2 = (
    np.float32(2.16906091723634e-4),
    np.float32(1.2443081507784591e-3),
    np.float32(9.678472554515764e-3),
    np.float32(5.548352472393272e-2),
    np.float32(2.4022979581425571e-1),
    np.float32(6.931469870574746e-1),
    np.float32(1.000000001815494),
)


@njit(fastmath=True, inline="always")
def _exp_sum(row, n, top, scratch):
    """``row[:n] = exp(row[:n] - top)``, returning their sum. libm's expf is a call per element
    that the compiler cannot vectorize (a fifth of the kernel's time at long contexts); this is
    2^x split as 2^k * 2^f, the polynomial in one loop and 2^k built from its exponent bits in
    ``scratch`` (fp32, at least n), so both loops vectorize."""
    bits = scratch.view(np.int32)
    c6, c5, c4, c3, c2, c1, c0 = _EXP2
    for t in range(n):
        x = max((row[t] - top) * np.float32(1.4426950408889634), np.float32(-126.0))
        k = np.floor(x)
        f = x - k
        row[t] = ((((((c6 * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f) + c0
        bits[t] = (np.int32(k) + 127) << 23
    total = np.float32(0.0)
    for t in range(n):
        e = row[t] * scratch[t]
        row[t] = e
        total += e
    return total


AHEAD = 4  # blocks hinted ahead of the one read (measured 1-8: 4 was best)


def _count(t: types.Type) -> int | None:
    """The length of a tuple type: how the vector kernels get sizes they compile in (a tuple's
    length is part of its type, so numba specializes on it and caches each; an int made literal
    with ``numba.literally`` made every call go through typing again: 3x the kernel's time)."""
    return t.count if isinstance(t, types.UniTuple) else None


@intrinsic
def _key_scores(typingctx, keys, row0, qs, scores, col, group, dim):
    """``scores[g, col + t] = qs[g] . keys[row0 + t]`` for the 16 rows from ``row0`` and every
    query head g of the group: the 16 dot products of a head are summed across lanes together
    (numba_vec.Transposer), not each on its own."""
    g_count, chunks = _count(group), _count(dim)
    if g_count is None or chunks is None:
        return None
    sig = types.void(keys, types.intp, qs, scores, types.intp, group, dim)

    def codegen(context, builder, sig, args):
        keys_a, row0, qs_a, scores_a, col = args[:5]
        kt, qt, st = sig.args[0], sig.args[2], sig.args[3]
        karr = context.make_array(kt)(context, builder, keys_a)
        qarr = context.make_array(qt)(context, builder, qs_a)
        sarr = context.make_array(st)(context, builder, scores_a)

        def at(ty, arr, *idx):
            return cgutils.get_item_pointer(context, builder, ty, arr, list(idx))

        c = vec.const
        for g in range(g_count):  # a head at a time: all of them at once spilled registers
            q = [vec.load16(builder, at(qt, qarr, c(g), c(0)), c(16 * j)) for j in range(chunks)]
            sums = vec.Transposer(builder)
            for t in range(16):
                row = at(kt, karr, builder.add(row0, c(t)), c(0))
                p = builder.fmul(q[0], vec.load16(builder, row, c(0)), flags=vec.FAST)
                for j in range(1, chunks):
                    term = builder.fmul(q[j], vec.load16(builder, row, c(16 * j)), flags=vec.FAST)
                    p = builder.fadd(p, term, flags=vec.FAST)
                sums.push(p)
            dst = builder.bitcast(at(st, sarr, c(g), col), vec.V16F.as_pointer())
            builder.store(sums.result(), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _value_sums(typingctx, values, tables, i, nblocks, bs, scores, out, r, h, group, dim):
    """``out[r, h G + g] = sum over t of scores[g, t] values[t]`` over sequence i's blocks: the
    group's accumulators stay in registers for the whole pass (a slice of the head dimension at
    a time, at most 16 vectors), each value row widened once for every query head."""
    g_count, chunks = _count(group), _count(dim)
    if g_count is None or chunks is None:
        return None
    sig = types.void(
        values, tables, types.intp, types.intp, types.intp, scores, out, types.intp, types.intp, group, dim
    )

    def codegen(context, builder, sig, args):
        values_a, tables_a, i, nblocks, bs, scores_a, out_a, r, h = args[:9]
        vt, tt, st, ot = sig.args[0], sig.args[1], sig.args[5], sig.args[6]
        varr, tarr = (
            context.make_array(vt)(context, builder, values_a),
            context.make_array(tt)(context, builder, tables_a),
        )
        sarr, oarr = (
            context.make_array(st)(context, builder, scores_a),
            context.make_array(ot)(context, builder, out_a),
        )

        def at(ty, arr, *idx):
            return cgutils.get_item_pointer(context, builder, ty, arr, list(idx))

        c, add, mul = vec.const, builder.add, builder.mul
        chunk = max(1, 16 // g_count)  # vectors of the head dimension per pass
        per_line = 64 // (vt.dtype.bitwidth // 8) // 16  # vectors a cache line holds
        zero = ir.Constant(vec.V16F, [0.0] * 16)
        last = builder.sub(nblocks, c(1))
        for first in range(0, chunks, chunk):
            width = min(chunk, chunks - first)
            acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(width)] for _ in range(g_count)]
            with cgutils.for_range(builder, nblocks) as blocks:
                b = blocks.index
                base = mul(builder.sext(builder.load(at(tt, tarr, i, b)), vec.I64), bs)
                later = add(b, c(AHEAD))
                ahead = builder.select(builder.icmp_signed("<", later, last), later, last)
                ahead = mul(builder.sext(builder.load(at(tt, tarr, i, ahead)), vec.I64), bs)
                with cgutils.for_range(builder, bs) as rows:
                    t = rows.index
                    for j in range(0, width, per_line):
                        vec.prefetch(builder, at(vt, varr, add(ahead, t), c(16 * (first + j))))
                    row = at(vt, varr, add(base, t), c(16 * first))
                    v = [vec.load16(builder, row, c(16 * j)) for j in range(width)]
                    col = add(mul(b, bs), t)
                    for g in range(g_count):
                        p = vec.splat(builder, builder.load(at(st, sarr, c(g), col)))
                        for j in range(width):
                            term = builder.fmul(p, v[j], flags=vec.FAST)
                            builder.store(
                                builder.fadd(builder.load(acc[g][j]), term, flags=vec.FAST), acc[g][j]
                            )
            for g in range(g_count):
                dst = at(ot, oarr, r, add(mul(h, c(g_count)), c(g)), c(16 * first))
                for j in range(width):
                    builder.store(
                        builder.load(acc[g][j]), vec.vector_at(builder, dst, c(16 * j), vec.V16F), align=4
                    )
        return context.get_dummy_value()

    return sig, codegen


@njit(fastmath=True, inline="always")
def _attend_vec(q, kv, rows, tables, lens, scale, bs, out, i, h, group, dim):
    """``_attend`` for blocks of a multiple of 16 rows and a head dimension of a multiple of 16,
    with the group size and head dimension compiled in: the inner loops are vector IR."""
    r = rows[i]
    length = lens[i]
    nblocks = (length + bs - 1) // bs
    heads, width = len(group), q.shape[2]
    scores = np.empty((heads, nblocks * bs), dtype=np.float32)
    scratch = np.empty(nblocks * bs, dtype=np.float32)
    qs = np.empty((heads, width), dtype=np.float32)
    for g in range(heads):
        for d in range(width):
            qs[g, d] = q[r, h * heads + g, d] * scale
    keys = kv[0, h]
    for b in range(min(AHEAD, nblocks)):
        _prefetch_block(keys, tables[i, b] * bs, bs)
    for b in range(nblocks):
        _prefetch_block(keys, tables[i, min(b + AHEAD, nblocks - 1)] * bs, bs)
        for part in range(0, bs, 16):
            _key_scores(keys, tables[i, b] * bs + part, qs, scores, b * bs + part, group, dim)
    _softmax(scores, length, scratch)
    values = kv[1, h]
    for b in range(min(AHEAD, nblocks)):
        _prefetch_block(values, tables[i, b] * bs, bs)
    _value_sums(values, tables, i, nblocks, bs, scores, out, r, h, group, dim)


@njit(fastmath=True, inline="always")
def _softmax(scores, length, scratch):
    """Each row of ``scores`` softmaxed over its first ``length`` columns, the rest zeroed."""
    for g in range(scores.shape[0]):
        top = np.float32(-np.inf)
        for t in range(length):
            top = max(top, scores[g, t])
        total = _exp_sum(scores[g], length, top, scratch)
        inv = np.float32(1.0) / total
        for t in range(length):
            scores[g, t] *= inv
        for t in range(length, scores.shape[1]):  # the last block's slots past the context
            scores[g, t] = 0.0


@njit(parallel=True, fastmath=True, cache=True)
def decode_vec_parallel(q, kv, rows, tables, lens, scale, bs, out, group, dim):
    """``decode_vec`` with the tasks spread over numba's threads."""
    hkv = kv.shape[1]
    for task in prange(rows.shape[0] * hkv):
        _attend_vec(q, kv, rows, tables, lens, scale, bs, out, task // hkv, task % hkv, group, dim)


@njit(fastmath=True, cache=True)
def decode_vec(q, kv, rows, tables, lens, scale, bs, out, group, dim):
    """``decode_serial`` through ``_attend_vec``; ``group`` and ``dim`` are tuples of as many
    elements as the group has query heads and the head dimension has 16s (see ``_count``)."""
    hkv = kv.shape[1]
    for task in range(rows.shape[0] * hkv):
        _attend_vec(q, kv, rows, tables, lens, scale, bs, out, task // hkv, task % hkv, group, dim)


@njit(parallel=True, fastmath=True, cache=True)
def decode(q, kv, rows, tables, lens, scale, bs, out):
    """``out[rows[i]]`` = attention of ``q[rows[i]]`` over sequence i's ``lens[i]`` cached keys,
    its blocks ``tables[i]``; one task per (sequence, KV head) and its group of query heads."""
    hkv = kv.shape[1]
    for task in prange(rows.shape[0] * hkv):
        _attend(q, kv, rows, tables, lens, scale, bs, out, task // hkv, task % hkv)


@njit(fastmath=True, cache=True)
def decode_serial(q, kv, rows, tables, lens, scale, bs, out):
    """``decode`` on the calling thread: with one thread, numba's parallel launch is a tenth of
    a batch-1 call."""
    hkv = kv.shape[1]
    for task in range(rows.shape[0] * hkv):
        _attend(q, kv, rows, tables, lens, scale, bs, out, task // hkv, task % hkv)


@njit(fastmath=True, inline="always")
def _attend(q, kv, rows, tables, lens, scale, bs, out, i, h):
    """Sequence i's KV head h and its query heads: scores block by block, softmax, values."""
    heads, dim = q.shape[1], q.shape[2]
    group = heads // kv.shape[1]
    r = rows[i]
    length = lens[i]
    nblocks = (length + bs - 1) // bs
    scores = np.empty((group, nblocks * bs), dtype=np.float32)
    scratch = np.empty(nblocks * bs, dtype=np.float32)
    qs = np.empty((group, dim), dtype=np.float32)
    acc = np.zeros((group, dim), dtype=np.float32)
    for g in range(group):
        for d in range(dim):
            qs[g, d] = q[r, h * group + g, d] * scale
    keys = kv[0, h]
    values = kv[1, h]
    _prefetch_block(keys, tables[i, 0] * bs, bs)
    for b in range(nblocks):
        # Elements are read through a slice: an index ``base + t`` could be negative to numba,
        # whose wraparound check then kept the loops from vectorizing.
        block = keys[tables[i, b] * bs : (tables[i, b] + 1) * bs]
        _prefetch_block(keys, tables[i, b + 1 if b + 1 < nblocks else b] * bs, bs)  # the next one
        for g in range(group):
            for t in range(bs):
                s = np.float32(0.0)
                for d in range(dim):
                    s += qs[g, d] * as_f32(block[t, d])
                scores[g, b * bs + t] = s
    _softmax(scores, length, scratch)
    _prefetch_block(values, tables[i, 0] * bs, bs)
    for b in range(nblocks):
        block = values[tables[i, b] * bs : (tables[i, b] + 1) * bs]
        ahead = tables[i, b + 1 if b + 1 < nblocks else b] * bs
        for t in range(bs):
            _prefetch_row(values, ahead + t)
            for g in range(group):
                p = scores[g, b * bs + t]
                for d in range(dim):
                    acc[g, d] += p * as_f32(block[t, d])
    for g in range(group):
        for d in range(dim):
            out[r, h * group + g, d] = acc[g, d]
