"""LLVM vector IR for the numba kernels' inner loops, where numba's own code does not vectorize.

numba widens small-integer arithmetic to 64 bits and keeps arrays in memory, so a loop that
unpacks nibbles or holds a dozen accumulators across a block compiles to scalar or spilled code.
These helpers build the loops' bodies in a numba ``@intrinsic`` instead: 16-lane fp32 vectors
(one AVX-512 register), bf16 rows widened exactly, and the transposing sum of 16 vectors.

numba's disk cache keys a kernel on its own file only: after editing this one, touch
numba_attention.py and numba_int4.py (an installed upgrade renews every file, so users never
meet a stale kernel).
"""

from __future__ import annotations

from llvmlite import ir

F32 = ir.FloatType()
I8 = ir.IntType(8)
I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
V16F = ir.VectorType(F32, 16)
FAST = ("fast",)


def const(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


def vector_at(builder: ir.IRBuilder, base: ir.Value, index: ir.Value, vtype: ir.VectorType) -> ir.Value:
    """A pointer to the vector of ``vtype`` at element ``index`` of scalar pointer ``base``."""
    return builder.bitcast(builder.gep(base, [index]), vtype.as_pointer())


def splat(builder: ir.IRBuilder, value: ir.Value, lanes: int = 16) -> ir.Value:
    vtype = ir.VectorType(value.type, lanes)
    undef = ir.Constant(vtype, None)
    one = builder.insert_element(undef, value, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(I32, lanes), [0] * lanes))


def load16(builder: ir.IRBuilder, base: ir.Value, index: ir.Value) -> ir.Value:
    """16 elements from ``index`` of ``base`` as fp32: an fp32 pointer's as they are, an i16
    pointer's as bf16 bits (``widen_bf16``)."""
    if base.type.pointee == F32:
        return builder.load(vector_at(builder, base, index, V16F), align=4)
    return widen_bf16(builder, builder.load(vector_at(builder, base, index, ir.VectorType(I16, 16)), align=2))


def widen_bf16(builder: ir.IRBuilder, bits: ir.Value) -> ir.Value:
    """The fp32s whose upper halves are these 16-bit values, a scalar or a vector: a bf16 exactly
    (signed or not, the bits are zero-extended)."""
    if isinstance(bits.type, ir.VectorType):
        lanes = bits.type.count
        wide = builder.zext(bits, ir.VectorType(I32, lanes))
        shifted = builder.shl(wide, ir.Constant(ir.VectorType(I32, lanes), [16] * lanes))
        return builder.bitcast(shifted, ir.VectorType(F32, lanes))
    return builder.bitcast(builder.shl(builder.zext(bits, I32), ir.Constant(I32, 16)), F32)


def prefetch(builder: ir.IRBuilder, address: ir.Value) -> None:
    """Hint the line holding ``address`` into L2 (locality 2: prefetcht1). Hints into L1 took the
    L1's few miss buffers: blocks scattered through the pool streamed at 9 GB/s against 11.7."""
    i8p = I8.as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i8p, I32, I32, I32])
    fn = builder.module.globals.get("llvm.prefetch.p0i8") or ir.Function(
        builder.module, fnty, "llvm.prefetch.p0i8"
    )
    hint = [ir.Constant(I32, 0), ir.Constant(I32, 2), ir.Constant(I32, 1)]  # read, L2, data
    builder.call(fn, [builder.bitcast(address, i8p), *hint])


class Transposer:
    """Sums 16 vectors lane-wise into one: lane t of the result is the sum of the lanes of the
    t-th vector pushed. Pairs of partial results are combined as they complete (a binary counter),
    each combination two shuffles and an add, 15 in all where 16 horizontal sums took 8 steps each,
    and at most five vectors are live at a time."""

    def __init__(self, builder: ir.IRBuilder) -> None:
        self.builder = builder
        self.stack: list[tuple[ir.Value, list[int]]] = []  # (vector, token of each lane group)
        self.pushed = 0

    def push(self, vector: ir.Value) -> None:
        self.stack.append((vector, [self.pushed]))
        self.pushed += 1
        while len(self.stack) >= 2 and len(self.stack[-1][1]) == len(self.stack[-2][1]):
            (y, ty), (x, tx) = self.stack.pop(), self.stack.pop()
            self.stack.append(self._combine(x, tx, y, ty))

    def _combine(self, x: ir.Value, tx: list[int], y: ir.Value, ty: list[int]) -> tuple[ir.Value, list[int]]:
        width = 16 // len(tx)  # lanes each token holds in x and in y
        first, second, tokens = [], [], []
        for slot, (a, b) in enumerate(zip(tx, ty, strict=True)):
            for source, token in ((0, a), (16, b)):
                start = source + slot * width
                first += range(start, start + width // 2)
                second += range(start + width // 2, start + width)
                tokens.append(token)
        b = self.builder
        mask = lambda idx: ir.Constant(ir.VectorType(I32, 16), idx)  # noqa: E731
        low = b.shuffle_vector(x, y, mask(first))
        high = b.shuffle_vector(x, y, mask(second))
        return b.fadd(low, high, flags=FAST), tokens

    def result(self) -> ir.Value:
        """The 16 sums in push order (after exactly 16 pushes)."""
        assert self.pushed == 16 and len(self.stack) == 1
        vector, tokens = self.stack[0]
        order = [tokens.index(t) for t in range(16)]
        undef = ir.Constant(V16F, None)
        return self.builder.shuffle_vector(vector, undef, ir.Constant(ir.VectorType(I32, 16), order))
