"""numba kernels for the CPU's decode step, where a torch op's fixed cost or a copy is the step.

**Paged decode attention.** The portable chunk path (attention.py) gathers each decode group's
blocks into a workspace and runs two batched matmuls over it: at long contexts the copy is most
of the step, and it needs the cache in the dtype the matmuls read. ``decode_attention`` walks each
sequence's blocks in place instead, one task per (sequence, KV head), all of that head's query
heads (GQA) against each block while it is in cache, prefetching the next block:

- scores of the block's keys for every query head in fp32, the keys converted as they are read
  (a bf16 cache is read as its upper 16 bits: half the bytes of fp32, converted exactly);
- softmax over the visible keys in fp32;
- the values' weighted sum, block by block again.

Where blocks hold a multiple of 16 rows and the head dimension is a multiple of 16 (every model
tandem serves, at the default block size), a vector kernel does it (numba_attention.decode_vec):
the group size and head dimension compiled in, the 16 key scores of a head summed across lanes
together, the values' accumulators in registers for the whole pass, and the blocks hinted into L2
four ahead. Other shapes take the scalar kernel (``decode_serial``).

**RMSNorm.** torch's CPU rms_norm is a composite of several ops (pow, mean, add, rsqrt, mul),
61 calls a step on the default model; the kernel is one call, and the pre-MLP norm takes the
residual add with it (two torch ops fewer again).

**Rope and the KV-cache write.** Rotating q and k in the fused QKV output and copying k and v into
the cache took a dozen torch ops a layer (slices, four in-place multiplies, a temporary, a dtype
conversion, an indexed copy); the kernel is one call. It rounds to bf16 as torch does (to nearest
even), so the cache holds what the torch ops would have written.

**Packed int4 matmul.** torch's int4 kernel takes bf16 activations and bf16 (scale, zero) pairs,
and the pairs' rounding was the largest part of the packed path's error, which a second call
repaired for the attention projections at twice the cost. ``Int4Matmul`` reads torch's own pack
(no second copy of the codes) with fp32 activations and fp16 or fp32 pairs, so it is exact to fp32
rounding, and it was faster than torch's kernel alone at every row count measured (1-32 rows).

``python benchmarks/bench_cpu_kernels.py`` (default model's shapes, one thread, idle machine):
attention over the 30 layers of a decode step, chunk path with an fp32 cache -> this kernel with
a bf16 cache: batch 1 at context 128 2.0 -> 0.6 ms, batch 8 at 128 9.4 -> 2.6, batch 8 at 2048
140 -> 35, batch 32 at 256 70 -> 19; rms_norm of one row of 576, 10.3 -> 6.4 us a call.

Compiled on first use and cached on disk by numba (seconds, once per machine); the worker warms
them at load (``warm_up``) so no request waits on the compiler.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# Cache dtypes the attention kernel reads (bf16 as its raw 16 bits).
SUPPORTED_CACHE_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def available() -> bool:
    """Whether numba imports here (it is a dependency; a broken install falls back to torch)."""
    try:
        import numba
        import numba.np.linalg
    except Exception as e:
        log.warning("numba is unavailable (%s): the CPU decode step runs torch ops only", e)
        return False
    # numba's first compile (or cache load) checks for a BLAS by importing scipy.linalg, 0.4 s of
    # every worker start where scipy is installed; these kernels call no BLAS, so the check is
    # answered "none" (numba then refuses np.dot in kernels, which they never use).
    if hasattr(numba.np.linalg, "ensure_blas"):
        numba.np.linalg.ensure_blas = _no_blas
    return True


def _no_blas() -> None:
    raise ImportError("tandem's CPU kernels use no BLAS")


def supports(cache_dtype: torch.dtype) -> bool:
    """Whether ``decode_attention`` reads a cache of this dtype."""
    return cache_dtype in SUPPORTED_CACHE_DTYPES and available()


def _as_numpy(kv_layer: torch.Tensor) -> np.ndarray:
    return (kv_layer.view(torch.int16) if kv_layer.dtype == torch.bfloat16 else kv_layer).numpy()


def decode_attention(
    q: torch.Tensor,  # (T, H, D) fp32, any row stride
    kv_layer: torch.Tensor,  # (2, Hkv, slots, D) fp32 or bf16
    rows: np.ndarray,  # (n,) int64 token rows of the decode sequences
    block_tables: torch.Tensor,  # (n, max_blocks) int32
    context_lens: torch.Tensor,  # (n,) int32
    block_size: int,
    scale: float,
    out: torch.Tensor,  # (T, H, D) fp32: rows `rows` are written
) -> None:
    if q.dtype != torch.float32 or out.dtype != torch.float32:
        raise TypeError(f"CPU decode attention takes fp32 queries and output, got {q.dtype}, {out.dtype}")
    from tandem.gpu_worker.model import numba_attention as k

    args = (
        q.numpy(),
        _as_numpy(kv_layer),
        rows,
        block_tables.numpy(),
        context_lens.numpy(),
        np.float32(scale),
        block_size,
        out.numpy(),
    )
    sizes = _vector_sizes(q.shape[1] // kv_layer.shape[1], q.shape[2], block_size)
    if sizes is not None and out.stride(2) == 1 and kv_layer.is_contiguous():
        (k.decode_vec_parallel if _Launch.parallel else k.decode_vec)(*args, *sizes)
    else:
        (k.decode if _Launch.parallel else k.decode_serial)(*args)


@functools.cache
def _vector_sizes(group: int, dim: int, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The vector kernel's compiled-in sizes (tuples whose lengths are the query heads of a group
    and the 16s of the head dimension), or None where it does not apply."""
    if block_size % 16 or dim % 16:
        return None
    return (0,) * group, (0,) * (dim // 16)


def rope_applies(qkv: torch.Tensor, kv_layer: torch.Tensor) -> bool:
    """Whether ``rope_and_store`` takes these: fp32 rows on the CPU, a cache the kernel writes."""
    return (
        qkv.device.type == "cpu"
        and qkv.dtype == torch.float32
        and qkv.dim() == 2
        and qkv.stride(1) == 1
        and kv_layer.dtype in SUPPORTED_CACHE_DTYPES
        and kv_layer.is_contiguous()
        and available()
    )


def rope_and_store(
    qkv: torch.Tensor,  # (T, q + 2 kv) fp32: the fused projection's output, rows contiguous
    q_size: int,
    cos: torch.Tensor,  # (T, D/2) fp32
    sin: torch.Tensor,
    kv_layer: torch.Tensor,  # (2, Hkv, slots, D) fp32 or bf16
    slot_mapping: torch.Tensor,  # (T,) int64
) -> None:
    """Rope of the q and k heads in place, then k and v into the cache: one call for what took a
    dozen torch ops a layer (fused.rotate_half_ and attention.write_kv)."""
    from tandem.gpu_worker.model.numba_rope import rope_store

    rope_store(qkv.numpy(), q_size, cos.numpy(), sin.numpy(), _as_numpy(kv_layer), slot_mapping.numpy())


@functools.cache
def int4_pack_is_blocked() -> bool:
    """Whether torch packs int4 weights here as ``numba_int4`` reads them: (N/64, K, 32) bytes, byte
    j of (block b, column k) row 64b + j's code (low nibble) and row 64b + 32 + j's (high). The
    layout is torch's and may differ by build or CPU, so it is checked once on a probe."""
    if not available() or not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return False
    n, k = 128, 64
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    if packed.dtype != torch.uint8 or packed.numel() != n * k // 2:
        return False
    blocks = codes.view(n // 64, 2, 32, k).permute(0, 3, 1, 2)  # (b, k, half, j)
    expected = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).to(torch.uint8)
    return torch.equal(packed.view(n // 64, k, 32), expected)


def int4_matmul_applies(padded_rows: int) -> bool:
    """Whether ``Int4Matmul`` takes a weight of this many (padded) output rows."""
    return padded_rows % 64 == 0 and int4_pack_is_blocked()


class Int4Matmul:
    """``x @ W.T`` in fp32 over torch's int4 pack of W (see numba_int4) with fp16 or fp32 (scale,
    offset) pairs ``pairs`` (N/64, G, 2, 64). The arrays the kernel reads are made once: converting
    four tensors a call cost 9 us against the kernel's own 1 us at one row, 120 calls a step."""

    def __init__(self, packed: torch.Tensor, pairs: torch.Tensor) -> None:
        from tandem.gpu_worker.model import numba_int4

        self._kernels = numba_int4
        blocks = pairs.shape[0]
        self.rows = blocks * 64
        self._packed = packed.numpy().reshape(blocks, -1, 32)
        # numba has no fp16: the kernel reads fp16 pairs as their 16 bits
        self._pairs = (pairs.view(torch.int16) if pairs.dtype == torch.float16 else pairs).numpy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (M, K) fp32, C-contiguous
        out = np.empty((x.shape[0], self.rows), dtype=np.float32)
        kernel = self._kernels.matmul_parallel if _Launch.parallel else self._kernels.matmul
        kernel(self._packed, x.numpy(), self._pairs, out)
        return torch.from_numpy(out)


class _Launch:
    """How the attention and int4 kernels run: on the calling thread unless the worker has more
    than one (``warm_up``); numba's thread pool is started only then."""

    parallel = False


def norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``rms_norm`` / ``add_rms_norm_`` take these: fp32 rows on the CPU."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and x.stride(1) == 1
        and available()
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from tandem.gpu_worker.model.numba_norms import rms_norm as kernel

    out = torch.empty(x.shape, dtype=x.dtype)
    kernel(x.numpy(), weight.numpy(), np.float32(eps), out.numpy())
    return out


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += delta`` in place; returns RMSNorm of the sum."""
    from tandem.gpu_worker.model.numba_norms import add_rms_norm as kernel

    out = torch.empty(x.shape, dtype=x.dtype)
    kernel(x.numpy(), delta.numpy(), weight.numpy(), np.float32(eps), out.numpy())
    return out


def warm_up(
    cache_dtype: torch.dtype | None,
    threads: int,
    int4: bool = False,
    attention: tuple[int, int, int, int] | None = None,
) -> None:
    """Compile (or load from numba's disk cache) the kernels, the attention one for this cache
    dtype (None: none) and the int4 matmul if ``int4`` (a third of a second to load, so only for
    models that call it), and give them the worker's thread count, before the first step.
    ``attention``: the model's (heads, KV heads, head dim, block size), whose sizes the vector
    attention kernel compiles in.

    numba compiles once per argument layout: one row is C-contiguous to it, several rows of a view
    into a wider buffer (the queries in the fused QKV output) are strided, so both are warmed.
    """
    import numba

    _Launch.parallel = threads > 1
    if _Launch.parallel:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        # numba's OpenMP layer shares torch's OpenMP runtime and sets its thread count to numba's
        # whole pool when it starts (2 here), so a one-thread worker silently ran torch on both
        # cores: torch's count is set again, and a one-thread worker never starts numba's pool.
        torch.set_num_threads(threads)
    if int4 and int4_pack_is_blocked():
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(64, 32, dtype=torch.int32), 1)
        for dtype in (torch.float16, torch.float32):  # the pairs' two dtypes
            Int4Matmul(packed, torch.zeros(1, 1, 2, 64, dtype=dtype))(torch.ones(1, 32))
    heads, hkv, dim, bs = 2, 1, 8, 4
    w = torch.ones(dim)
    for rows in (1, 2):
        wide = torch.ones(rows, 2 * heads, dim)
        x = torch.ones(rows, dim)
        rms_norm(x, w, 1e-5)
        add_rms_norm_(x, x.clone(), w, 1e-5)
        rms_norm(wide.view(rows, -1)[:, :dim], w, 1e-5)
        if cache_dtype is not None:
            kv = torch.zeros(2, hkv, 2 * bs, dim, dtype=cache_dtype)
            slots = torch.arange(rows)
            cos = sin = torch.ones(rows, dim // 2)
            width = (heads + 2 * hkv) * dim  # a fused QKV output, alone or a view into a padded one
            for qkv in (torch.ones(rows, width), torch.ones(rows, width + 16)[:, :width]):
                rope_and_store(qkv, heads * dim, cos, sin, kv, slots)
            _warm_attention(cache_dtype, rows, heads, hkv, dim, bs)
            if attention is not None:
                _warm_attention(cache_dtype, rows, *attention)


def _warm_attention(cache_dtype: torch.dtype, rows: int, heads: int, hkv: int, dim: int, bs: int) -> None:
    """One decode_attention call of this shape; the queries of several rows are a view into a
    wider buffer, as in the fused QKV output."""
    q = torch.ones(rows, heads + 2 * hkv, dim)[:, :heads]
    kv = torch.zeros(2, hkv, bs, dim, dtype=cache_dtype)
    tables = torch.zeros(rows, 1, dtype=torch.int32)
    lens = torch.ones(rows, dtype=torch.int32)
    decode_attention(q, kv, np.arange(rows), tables, lens, bs, 1.0, torch.empty(rows, heads, dim))
