"""Matmuls that read packed GGUF weights on the CPU: torch's weight-only int4 kernel, group size 32.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)`` computes ``x @ W.T`` for
``W[n, k] = (c[n, k] - 8) * sz[g, n, 0] + sz[g, n, 1]``, g = k // 32, with 4-bit codes ``c``. Its
only fast path is bf16 activations with bf16 (scale, zero) pairs: fp32 and fp16 ran 40x slower
than bf16 on this torch, so the kernel always sees bf16 whatever the compute dtype.

Codes of up to 8 bits (tandem.formats.gguf_packed.AffineCodes, ``w = s*q + o``) are split into two
4-bit planes, ``q = 16*h + l`` with ``h = q >> 4`` (signed) and ``l = q & 15``, laid side by side
along K: plane ``l`` has scale ``s`` and zero ``8s + o``, plane ``h`` scale ``16s`` and zero 0.
The activations are repeated to match, so one kernel call sums both planes. The zeros of Q8_0
and Q5_0 are then multiples of their bf16 scale, so bf16 rounds only the scale, as a bf16
weight would be rounded. A decode step reads 0.625 bytes a weight for 4-bit codes, 1.25 for
wider ones, against 4 for fp32.

bf16 rounds every group's scale, a coherent error across its 32 weights that measured as the largest
part of the packed path's divergence from float32 (KL 2.5e-3 of 4.6e-3 on the default model). So
inputs of up to 64 rows (decode steps) go through ``cpu_kernels.Int4Matmul`` instead wherever it
reads this torch's pack: the same packed codes, fp32 activations and the file's own scales (fp16,
or fp32 where fp16 does not hold them), exact to fp32 rounding and faster than torch's kernel at
every row count measured (``benchmarks/bench_cpu_kernels.py``: the 120 layer matmuls of a
default-model step at one row 6.6 ms, against 7.8 through torch's kernel and 9.9 with its second
call for the attention projections).
The weight then keeps only those pairs; torch's bf16 ones are made from them for bigger inputs
(prefill chunks without dense copies), which are compute-bound and take torch's kernel. Where the
exact kernel does not apply (no numba, another pack layout, output rows not in blocks of 64), the
attention projections, the most sensitive to the rounding, get a second torch call that adds
back what bf16 rounded off (``exact_scales``): KL 3.5e-3 -> 2.3e-3 for about 5% of a decode step.
Around the kernels the model keeps its activations in fp32 (see LlamaModel).

The kernel's cost grows with the rows of ``x`` faster than a bf16 GEMM's does, so a linear that
also holds a dense copy of its weight switches to the GEMM from a row count measured once at
load: the tied output head shares the embedding table (``QuantLinear.calibrate``); the layers get
copies of their own where the model can afford them (``make_dense_copy``, ``choose_dense_rows``;
the policy is LlamaModel.choose_kernels'). Small steps keep reading the packed codes, big
batches and prefill chunks run GEMMs.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tandem.formats.gguf_packed import GROUP, AffineCodes
from tandem.gpu_worker.model import cpu_kernels
from tandem.gpu_worker.model.layers import Linear

log = logging.getLogger(__name__)

# _convert_weight_to_int4pack_for_cpu wants the output dimension in multiples of 16.
_N_ALIGN = 16
_PACK_ROWS = 1024  # rows packed at a time: a multiple of the packer's row blocks
# Up to this many rows the second (exact-scales) call re-reads codes still in cache, about 5% of
# a decode step here; a prefill chunk is compute-bound, where it would cost a quarter of the step.
_EXACT_SCALES_MAX_ROWS = 64
_CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)
# The layers' dense copies must beat the packed kernels by this much in the calibration pass: near
# the break-even (8-16 rows on the default model) a pass with nothing between the matmuls favoured
# the copies, while whole decode steps at 8 rows ran 25% slower with them.
_DENSE_MARGIN = 0.8

Part = torch.Tensor | AffineCodes


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo's flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.partition(":")[2].split()))
    return False


def int4_kernel_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def _pack(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


@functools.cache
def _packing_splits_by_rows() -> bool:
    """Whether packing rows in runs of _PACK_ROWS gives the whole matrix's packing. The layout is
    torch's (blocks of 64 rows on this build), so it is checked once rather than assumed."""
    q = torch.randint(0, 16, (2 * _PACK_ROWS + _N_ALIGN, 64), dtype=torch.int32)
    parts = [_pack(q[r : r + _PACK_ROWS]) for r in range(0, q.shape[0], _PACK_ROWS)]
    return torch.equal(_pack(q), torch.cat(parts))


class Int4Planes(nn.Module):
    """Row-stacked matrices of one plane count as torch int4-packed planes (one kernel call).

    ``exact_scales`` adds a second call over the same codes whose (scale, zero) pairs are what
    bf16 rounded off the first call's, so the sum has fp32-accurate scales: twice the kernel time,
    for the layers where that rounding costs the most accuracy (see make_linear's callers).
    """

    def __init__(self, parts: Sequence[AffineCodes], exact_scales: bool = False) -> None:
        super().__init__()
        self.planes = max(p.planes for p in parts)
        codes = torch.cat([p.codes for p in parts]) if len(parts) > 1 else parts[0].codes
        scale = torch.cat([p.scale for p in parts]) if len(parts) > 1 else parts[0].scale
        offset = torch.cat([p.offset for p in parts]) if len(parts) > 1 else parts[0].offset
        self.out_features, self.in_features = (int(s) for s in codes.shape)
        pad = -self.out_features % _N_ALIGN
        self.register_buffer("packed", self._pack_codes(codes, pad), persistent=False)
        exact = None
        if cpu_kernels.int4_matmul_applies(self.out_features + pad):
            exact = self._exact_pairs(scale, offset, pad)
        # The exact kernel's pairs, or torch's bf16 ones (made from the exact pairs on demand for
        # inputs too big for that kernel, so a weight keeps one set of scales).
        self.register_buffer("exact_pairs", exact, persistent=False)
        self._exact: cpu_kernels.Int4Matmul | None = None  # made at the first call
        sz = self._scales_zeros(scale, offset)
        bf16_pairs = None if exact is not None else _pad_pairs(sz, pad)
        self.register_buffer("scales_zeros", bf16_pairs, persistent=False)
        # Without the exact kernel, the layers asked for it get the second torch call instead.
        residual = self._targets(scale, offset) - sz.float() if exact_scales and exact is None else None
        self.register_buffer(
            "residual_scales_zeros",
            None if residual is None else _pad_pairs(residual.to(torch.bfloat16), pad),
            persistent=False,
        )

    def _pack_codes(self, codes: torch.Tensor, pad: int) -> torch.Tensor:
        if pad:  # code 8 under a zero scale and zero: padded rows compute exact zeros
            codes = F.pad(codes, (0, 0, 0, pad), value=8)
        # The packer takes int32 codes, 4 bytes a weight per plane: packing a few rows at a time
        # keeps that temporary small whatever the matrix (a big vocabulary's table is GBs).
        step = _PACK_ROWS if _packing_splits_by_rows() else codes.shape[0]
        return torch.cat([self._pack_rows(codes[r : r + step]) for r in range(0, codes.shape[0], step)])

    def _pack_rows(self, codes: torch.Tensor) -> torch.Tensor:
        low = (codes & 15).to(torch.int32)
        q = low if self.planes == 1 else torch.cat([low, (codes >> 4).to(torch.int32) + 8], dim=1)
        return _pack(q)

    def _pairs(self, s: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """(G, N) scales and low-plane zeros -> (planes * G, N, 2); the high plane is (16 s, 0)."""
        low = torch.stack([s, zero], dim=-1)
        if self.planes == 1:
            return low
        return torch.cat([low, torch.stack([16 * s, torch.zeros_like(s)], dim=-1)], dim=0)

    def _targets(self, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        s = scale.t()
        return self._pairs(s, 8 * s + offset.t())

    def _scales_zeros(self, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        s = scale.t().to(torch.bfloat16).float()  # (G, N)
        # The zero is formed from the rounded scale, so a zero offset keeps zeros that are exact
        # multiples of the scale (bf16 then rounds the scale alone; 16 s is exact too).
        return self._pairs(s, 8 * s + offset.t()).to(torch.bfloat16)

    def _exact_pairs(self, scale: torch.Tensor, offset: torch.Tensor, pad: int) -> torch.Tensor:
        """(scale, offset) of ``w = code * scale + offset`` in the exact kernel's block order
        (N/64, G, 2, 64), in fp16 where that holds them exactly (the file's own scales are fp16 in
        Q4_0, Q4_1, Q5_x and Q8_0), else fp32; padded rows get zeros, so they output 0."""
        pairs = F.pad(torch.stack([scale.t(), offset.t()], dim=1).float(), (0, pad))  # (G, 2, N + pad)
        if torch.equal(pairs.half().float(), pairs):
            pairs = pairs.half()
        return pairs.unflatten(2, (-1, 64)).permute(2, 0, 1, 3).contiguous()

    def _bf16_pairs(self) -> torch.Tensor:
        """torch's kernel's (scale, zero) pairs, from the exact pairs when this linear has them."""
        if self.scales_zeros is not None:
            return self.scales_zeros
        s, o = self.exact_pairs.float().permute(1, 2, 0, 3).flatten(2).unbind(1)  # (G, N + pad) each
        s = s.to(torch.bfloat16).float()  # the zero from the rounded scale, as _scales_zeros does
        return self._pairs(s, 8 * s + o).to(torch.bfloat16).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) float
        if self.exact_pairs is not None and x.shape[0] <= _EXACT_SCALES_MAX_ROWS:
            xf = x.float().contiguous()
            if self.planes == 2:
                xf = torch.cat([xf, xf], dim=1)
            if self._exact is None:
                self._exact = cpu_kernels.Int4Matmul(self.packed, self.exact_pairs)
            y = self._exact(xf)
        else:
            xb = x.to(torch.bfloat16).contiguous()
            if self.planes == 2:
                xb = torch.cat([xb, xb], dim=1)
            y = self._mm(xb, self._bf16_pairs())
            if self.residual_scales_zeros is not None and x.shape[0] <= _EXACT_SCALES_MAX_ROWS:
                y = y.float().add_(self._mm(xb, self.residual_scales_zeros))
        return y if y.shape[1] == self.out_features else y[:, : self.out_features]

    def _mm(self, x: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, sz)


def _pad_pairs(sz: torch.Tensor, pad: int) -> torch.Tensor:
    return (F.pad(sz, (0, 0, 0, pad)) if pad else sz).contiguous()


class DenseRows(nn.Module):
    """Rows of a linear that the file stores as floats (F32, F16, BF16): a plain GEMM."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_features, self.in_features = (int(s) for s in weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


def _segment_key(p: Part) -> tuple[str, int]:
    return ("dense", 0) if isinstance(p, torch.Tensor) else ("int4", p.planes)


class QuantLinear(nn.Module):
    """``x @ W.T (+ b)`` where W is row-stacked parts, each packed int4 codes or dense floats.

    Consecutive parts of one kind (and plane count) share a kernel call; a fused QKV whose V is
    wider than its Q and K (mixed-quant files) becomes two calls rather than widening all three.
    """

    def __init__(
        self, parts: Sequence[Part], bias: torch.Tensor | None = None, exact_scales: bool = False
    ) -> None:
        super().__init__()
        if not parts:
            raise ValueError("QuantLinear needs at least one weight")
        groups: list[list[Part]] = []
        for p in parts:
            if groups and _segment_key(groups[-1][-1]) == _segment_key(p):
                groups[-1].append(p)
            else:
                groups.append([p])
        self.segments = nn.ModuleList(
            DenseRows(torch.cat(g) if len(g) > 1 else g[0])
            if isinstance(g[0], torch.Tensor)
            else Int4Planes(g, exact_scales)  # type: ignore[arg-type]
            for g in groups
        )
        widths = {int(s.in_features) for s in self.segments}
        if len(widths) != 1:
            raise ValueError(f"fused weights disagree on their input width: {sorted(widths)}")
        self.in_features = widths.pop()
        self.out_features = sum(int(s.out_features) for s in self.segments)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dense: nn.Parameter | None = None
        self.dense_min_rows = math.inf  # inputs with at least this many rows use ``dense``
        only = self.segments[0] if len(self.segments) == 1 else None
        self._single = only if isinstance(only, Int4Planes) else None  # the one kernel call, if one
        # What the weight was made of, until the model has chosen its kernels (make_dense_copy).
        self._sources: list[Part] | None = list(parts)

    def use_dense_copy(self, weight: nn.Parameter) -> None:
        """Offer a dense copy of the whole weight (shared, e.g. the embedding table) for large M."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"dense copy of shape {tuple(weight.shape)} does not match this linear")
        self.dense = weight

    def make_dense_copy(self, dtype: torch.dtype) -> None:
        """Decode the weight into a dense copy of its own in ``dtype`` (from the codes it was made of)."""
        if self._sources is None:
            raise RuntimeError("the packed sources of this linear were already released")
        parts = [p.dequantize(dtype) if isinstance(p, AffineCodes) else p.to(dtype) for p in self._sources]
        self.dense = nn.Parameter(torch.cat(parts) if len(parts) > 1 else parts[0], requires_grad=False)

    def drop_dense_copy(self) -> None:
        self.dense, self.dense_min_rows = None, math.inf

    def release_sources(self) -> None:
        self._sources = None

    @property
    def num_weights(self) -> int:
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._single is not None and x.dim() == 2 and x.shape[0] < self.dense_min_rows:
            # The decode step's common case, one packed segment: each op here costs a microsecond
            # or more a call, 120 calls a step.
            y = self._single(x).to(x.dtype)
            return y if self.bias is None else y + self.bias
        flat = x.reshape(-1, self.in_features)
        if self.dense is not None and flat.shape[0] >= self.dense_min_rows:
            y = self._dense(flat)
        else:
            y = self._packed(flat)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _dense(self, flat: torch.Tensor) -> torch.Tensor:
        assert self.dense is not None
        return F.linear(flat.to(self.dense.dtype), self.dense)

    def _packed(self, flat: torch.Tensor) -> torch.Tensor:
        outs = [s(flat) for s in self.segments]
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o.to(flat.dtype) for o in outs], dim=-1)

    @torch.inference_mode()
    def calibrate(self, rows: Sequence[int] = _CALIBRATION_ROWS, repeats: int = 3) -> float:
        """Time the packed kernel against the dense copy at each row count; use the dense copy
        from the first count where it wins twice running. Returns the threshold (inf: never)."""
        if self.dense is None:
            return math.inf
        self.dense_min_rows = math.inf

        def times(m: int) -> tuple[float, float]:
            assert self.dense is not None
            x = torch.randn(m, self.in_features).to(self.dense.dtype)
            return _best_ms(lambda: self._packed(x), repeats), _best_ms(lambda: self._dense(x), repeats)

        self.dense_min_rows = _first_dense_win(rows, times, margin=1.0)
        return self.dense_min_rows


@torch.inference_mode()
def choose_dense_rows(
    linears: Sequence[QuantLinear], rows: Sequence[int] = _CALIBRATION_ROWS, repeats: int = 2
) -> float:
    """One row count from which every linear of ``linears`` (each with a dense copy) uses its copy:
    the first where a pass over all of them through the dense copies beats one through the packed
    kernels by ``_DENSE_MARGIN`` twice running (inf: never).

    The passes time what a step does: every weight of the model read once, cold from memory,
    where the packed kernel reads 0.56-1.1 bytes a weight and a bf16 copy 2. Timing one linear
    on its own would time a warm cache, where the dense GEMM wins from one row on.
    """
    inputs = {n: {m: torch.randn(m, n) for m in rows} for n in {ql.in_features for ql in linears}}

    def times(m: int) -> tuple[float, float]:
        packed = _best_ms(lambda: [ql._packed(inputs[ql.in_features][m]) for ql in linears], repeats)
        dense = _best_ms(lambda: [ql._dense(inputs[ql.in_features][m]) for ql in linears], repeats)
        return packed, dense

    return _first_dense_win(rows, times, margin=_DENSE_MARGIN)


def _first_dense_win(
    rows: Sequence[int], times: Callable[[int], tuple[float, float]], margin: float
) -> float:
    """The first row count from which the dense path, (packed ms, dense ms) = ``times(m)``, takes
    less than ``margin`` times the packed one twice running (once, at the last count); inf: never."""
    wins = 0
    for i, m in enumerate(rows):
        packed, dense = times(m)
        log.debug("%d rows: packed %.2f ms, dense %.2f ms", m, packed, dense)
        wins = wins + 1 if dense < margin * packed else 0
        if wins == 2 or (wins == 1 and i == len(rows) - 1):
            return rows[i - wins + 1]
    return math.inf


def _best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # first call: allocation and kernel selection
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def make_linear(
    parts: Sequence[Part], bias: torch.Tensor | None = None, exact_scales: bool = False
) -> nn.Module:
    """A plain ``Linear`` when every part is a dense tensor, else a ``QuantLinear``
    (``exact_scales``: see Int4Planes)."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        dense = [p for p in parts if isinstance(p, torch.Tensor)]
        return Linear(torch.cat(dense) if len(dense) > 1 else dense[0], bias)
    return QuantLinear(parts, bias, exact_scales)
