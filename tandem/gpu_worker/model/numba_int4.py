"""Matmul over torch's CPU int4 pack with fp32 scales, as a numba kernel (see cpu_kernels.Int4Matmul).

torch's ``_convert_weight_to_int4pack_for_cpu`` lays a weight out as (N/64, K, 32) bytes: byte j
of (block b, column k) holds row 64b + j's code in its low nibble and row 64b + 32 + j's in its
high one. A column of 64 output rows is one 32-byte load, so the kernel accumulates
``x[m, k] * codes[64 rows, k]`` across a group of 32 columns as four 16-lane vectors, with no
horizontal sums, then applies the group's fp32 (scale, offset) pairs; those are stored in the same
block order, (N/64, G, 2, 64), so the whole pass reads two sequential streams.

numba widens arithmetic on small integers to 64 bits, which kept the nibble unpacking from
vectorizing, so the group's inner loop is written as LLVM vector IR (``_group_dot``, with
numba_vec's helpers); what is around it is plain numba. Module-level functions so numba caches
their machine code on disk.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from tandem.gpu_worker.model import numba_vec as vec

_F32, _I8, _I32, _FAST = vec.F32, vec.I8, vec.I32, vec.FAST
_V32F = ir.VectorType(_F32, 32)
_V32B = ir.VectorType(_I8, 32)
_i, _vector_at = vec.const, vec.vector_at
BLOCK_ROWS = 64  # output rows a column of the pack holds
GROUP = 32


def _splat(builder: ir.IRBuilder, value: ir.Value) -> ir.Value:
    return vec.splat(builder, value, 32)


def _make_group_dot(rows: int):
    """An intrinsic adding group g of pack block b, against ``rows`` rows of x from m0, into y."""

    @intrinsic
    def group_dot(typingctx, packed, b, g, x, m0, xsum, pairs, pg, coefs, y):
        sig = types.void(packed, types.intp, types.intp, x, types.intp, xsum, pairs, types.intp, coefs, y)
        half = isinstance(pairs.dtype, types.Integer)  # fp16 pairs as their 16 bits (numba has no fp16)

        def codegen(context, builder, sig, args):
            pk, xa, xs, pa, ya = (
                context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 3, 5, 6, 9)
            )
            b, g, m0, pg, coefs = args[1], args[2], args[4], args[7], args[8]
            add, mul, fast = builder.add, builder.mul, _FAST
            k_width, x_width = builder.extract_value(pk.shape, 1), builder.extract_value(xa.shape, 1)
            groups, n_width = builder.extract_value(xs.shape, 1), builder.extract_value(ya.shape, 1)
            pair_groups = builder.extract_value(pa.shape, 1)
            pdata = builder.bitcast(pk.data, _I8.as_pointer())
            xdata, xsdata, ydata = (builder.bitcast(a.data, _F32.as_pointer()) for a in (xa, xs, ya))
            pair_type = ir.IntType(16) if half else _F32
            pairdata = builder.bitcast(pa.data, pair_type.as_pointer())
            pair_vector = ir.VectorType(pair_type, 32)
            # Accumulators in allocas of the entry block: LLVM keeps them in registers.
            zeros = ir.Constant(_V32F, [0.0] * 32)
            acc = [[cgutils.alloca_once_value(builder, zeros) for _ in range(2)] for _ in range(rows)]
            low_mask, four = ir.Constant(_V32B, [15] * 32), ir.Constant(_V32B, [4] * 32)
            k0 = mul(g, _i(GROUP))
            with cgutils.for_range(builder, _i(GROUP)) as loop:
                k = add(k0, loop.index)
                column = mul(add(mul(b, k_width), k), _i(32))
                codes = builder.load(_vector_at(builder, pdata, column, _V32B), align=1)
                halves = (
                    builder.uitofp(builder.and_(codes, low_mask), _V32F),  # rows 64b .. 64b + 31
                    builder.uitofp(builder.lshr(codes, four), _V32F),  # rows 64b + 32 .. 64b + 63
                )
                for r in range(rows):
                    at = add(mul(add(m0, _i(r)), x_width), k)
                    xk = _splat(builder, builder.load(builder.gep(xdata, [at])))
                    for h in range(2):
                        prod = builder.fmul(halves[h], xk, flags=fast)
                        builder.store(builder.fadd(builder.load(acc[r][h]), prod, flags=fast), acc[r][h])
            # This group's scale and offset from its pair (s, o): (a s, b o + c s), (a, b, c) = coefs.
            a_s, b_o, c_s = (_splat(builder, builder.extract_value(coefs, i)) for i in range(3))
            n0 = mul(b, _i(BLOCK_ROWS))
            base = mul(add(mul(b, pair_groups), pg), _i(2 * BLOCK_ROWS))
            for h in range(2):
                at = add(base, _i(32 * h))
                s = builder.load(_vector_at(builder, pairdata, at, pair_vector), align=2)
                o = builder.load(_vector_at(builder, pairdata, add(at, _i(BLOCK_ROWS)), pair_vector), align=2)
                if half:
                    s, o = (
                        builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), 32)), _V32F)
                        for v in (s, o)
                    )
                scale = builder.fmul(a_s, s, flags=fast)
                zero = builder.fadd(
                    builder.fmul(b_o, o, flags=fast), builder.fmul(c_s, s, flags=fast), flags=fast
                )
                for r in range(rows):
                    row = add(m0, _i(r))
                    total = _splat(builder, builder.load(builder.gep(xsdata, [add(mul(row, groups), g)])))
                    yp = _vector_at(builder, ydata, add(mul(row, n_width), add(n0, _i(32 * h))), _V32F)
                    out = builder.fadd(
                        builder.load(yp, align=4),
                        builder.fmul(scale, builder.load(acc[r][h]), flags=fast),
                        flags=fast,
                    )
                    out = builder.fadd(out, builder.fmul(zero, total, flags=fast), flags=fast)
                    builder.store(out, yp, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return group_dot


_dot4, _dot2, _dot1 = _make_group_dot(4), _make_group_dot(2), _make_group_dot(1)


@njit(fastmath=True, inline="always")
def _group_sums(x, xsum):
    for m in range(x.shape[0]):
        for g in range(xsum.shape[1]):
            s = np.float32(0.0)
            for j in range(GROUP):
                s += x[m, g * GROUP + j]
            xsum[m, g] = s


@njit(fastmath=True, inline="always")
def _group_pair(g, pair_groups):
    """Column group g's pair index and coefficients (a, b, c): its scale is ``a s`` and its offset
    ``b o + c s`` from the pair (s, o). Codes wider than 4 bits are two 4-bit planes side by side
    (quant_linear.Int4Planes) whose high plane, codes h + 8 weighing 16 s h, shares the pair."""
    if g < pair_groups:
        return g, (np.float32(1.0), np.float32(1.0), np.float32(0.0))
    return g - pair_groups, (np.float32(16.0), np.float32(0.0), np.float32(-128.0))


@njit(fastmath=True, inline="always")
def _block(packed, b, x, xsum, pairs, y):
    """Output rows 64b .. 64b + 63 for every row of x: four rows of x at a time share the codes."""
    rows, groups, pair_groups = x.shape[0], xsum.shape[1], pairs.shape[1]
    for m in range(rows):
        for j in range(BLOCK_ROWS):
            y[m, b * BLOCK_ROWS + j] = 0.0
    m = 0
    while m < rows:
        for g in range(groups):
            pg, coefs = _group_pair(g, pair_groups)
            if rows - m >= 4:
                _dot4(packed, b, g, x, m, xsum, pairs, pg, coefs, y)
            elif rows - m >= 2:
                _dot2(packed, b, g, x, m, xsum, pairs, pg, coefs, y)
            else:
                _dot1(packed, b, g, x, m, xsum, pairs, pg, coefs, y)
        m += 4 if rows - m >= 4 else 2 if rows - m >= 2 else 1


@njit(fastmath=True, cache=True)
def matmul(packed, x, pairs, y):
    """``y = x @ W.T`` with ``W[n, k] = code[n, k] * scale + offset`` of (n, k // 32): ``packed``
    (N/64, K, 32) uint8 as torch packs it, ``x`` (M, K) fp32 C-contiguous, ``pairs`` (N/64, G, 2,
    64) fp32 scales then offsets, or fp16 ones as int16, G = K/32 for 4-bit codes or K/64 for two planes (see
    ``_group_pair``), ``y`` (M, N) fp32."""
    xsum = np.empty((x.shape[0], packed.shape[1] // GROUP), dtype=np.float32)
    _group_sums(x, xsum)
    for b in range(packed.shape[0]):
        _block(packed, b, x, xsum, pairs, y)


@njit(parallel=True, fastmath=True, cache=True)
def matmul_parallel(packed, x, pairs, y):
    """``matmul`` with the blocks of output rows spread over numba's threads."""
    xsum = np.empty((x.shape[0], packed.shape[1] // GROUP), dtype=np.float32)
    _group_sums(x, xsum)
    for b in prange(packed.shape[0]):
        _block(packed, b, x, xsum, pairs, y)
