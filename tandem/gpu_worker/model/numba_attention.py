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


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint the CPU to bring element ``index`` of C-contiguous ``arr`` (flat) into cache: a
    sequence's blocks are scattered through the pool, so the hardware prefetcher loses the
    stream at every block."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # read, keep in all levels (locality 3), data cache
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, types.intp), codegen


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    """The fp32 whose upper half is these 16 bits (a bf16, exactly; signed or not, the bits are
    zero-extended), as one shift and bitcast: numba has no scalar bitcast, and converting a block
    into an fp32 scratch first cost a store and a load an element."""

    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())

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
    for t in range(bs):
        _prefetch_row(keys, tables[i, 0] * bs + t)
    for b in range(nblocks):
        # Elements are read through a slice: an index ``base + t`` could be negative to numba,
        # whose wraparound check then kept the loops from vectorizing.
        block = keys[tables[i, b] * bs : (tables[i, b] + 1) * bs]
        ahead = tables[i, b + 1 if b + 1 < nblocks else b] * bs
        for t in range(bs):  # the next block hinted into cache a row at a time, spread over this one's work
            _prefetch_row(keys, ahead + t)
        for g in range(group):
            for t in range(bs):
                s = np.float32(0.0)
                for d in range(dim):
                    s += qs[g, d] * as_f32(block[t, d])
                scores[g, b * bs + t] = s
    for g in range(group):
        top = np.float32(-np.inf)
        for t in range(length):
            top = max(top, scores[g, t])
        total = _exp_sum(scores[g], length, top, scratch)
        inv = np.float32(1.0) / total
        for t in range(length):
            scores[g, t] *= inv
        for t in range(length, nblocks * bs):  # the last block's slots past the context
            scores[g, t] = 0.0
    for t in range(bs):
        _prefetch_row(values, tables[i, 0] * bs + t)
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
