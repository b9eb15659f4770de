"""Paged decode attention on the CPU: one numba kernel that reads the block table itself.

The portable chunk path (attention.py) gathers each decode group's blocks into a workspace and
runs two batched matmuls over it: at long contexts the copy is most of the step (batch 8 at
context 2048 on the default model: about 175 ms of attention a step, one thread), and the copy
needs the cache in the dtype the matmuls read. This kernel walks each sequence's blocks in
place, one task per (sequence, KV head), all of that head's query heads (GQA) against each block
while it is in cache, prefetching the next block:

- scores of the block's keys for every query head, in fp32, the keys converted as they are read
  (a bf16 cache is read as its upper 16 bits: half the bytes of fp32, exact conversion);
- softmax over the visible keys in fp32;
- the values' weighted sum, block by block again.

Measured on the default model's shape (9 query heads, 3 KV heads of 64; 30 layers; one thread,
blocks scattered through the pool), attention time per decode step, chunk path -> this kernel with a
bf16 cache: batch 1 at context 128 2.4 -> 0.6 ms, batch 8 at 128 10.8 -> 6.1 ms, batch 8 at
2048 175 -> 98 ms, batch 32 at 256 96 -> 48 ms (``python benchmarks/bench_cpu_attention.py``).

Compiled on first use and cached on disk by numba (a few seconds once per machine); the worker
warms it at load (``warm_up``) so no request waits on the compiler.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

# Cache dtypes the kernel reads (bf16 as its raw 16 bits).
SUPPORTED_CACHE_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def available() -> bool:
    """Whether numba imports here (it is a dependency; a broken install falls back to chunks)."""
    try:
        import numba  # noqa: F401
    except Exception as e:
        log.warning("numba is unavailable (%s): CPU decode attention runs the portable chunk path", e)
        return False
    return True


def supports(cache_dtype: torch.dtype) -> bool:
    return cache_dtype in SUPPORTED_CACHE_DTYPES and available()


@functools.cache
def _kernel():
    from tandem.gpu_worker.model.cpu_attention_kernel import decode

    return decode


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
    _kernel()(
        q.numpy(),
        _as_numpy(kv_layer),
        rows,
        block_tables.numpy(),
        context_lens.numpy(),
        np.float32(scale),
        block_size,
        out.numpy(),
    )


def warm_up(cache_dtype: torch.dtype, threads: int) -> None:
    """Compile (or load from numba's disk cache) the kernel for this cache dtype, and give it the
    worker's thread count, before the first step.

    numba compiles once per argument layout: the queries of one decode row are C-contiguous for
    it, those of several are a strided view into the fused QKV output, so both are warmed.
    """
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    heads, hkv, dim, bs = 2, 1, 8, 4
    kv = torch.zeros(2, hkv, 2 * bs, dim, dtype=cache_dtype)
    for rows in (1, 2):
        q = torch.zeros(rows, 2 * heads, dim)[:, :heads]
        tables = torch.zeros(rows, 1, dtype=torch.int32)
        lens = torch.ones(rows, dtype=torch.int32)
        out = torch.empty(rows, heads, dim)
        decode_attention(q, kv, np.arange(rows), tables, lens, bs, 1.0, out)
