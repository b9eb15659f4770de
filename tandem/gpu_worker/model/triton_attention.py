"""Paged decode attention as a Triton kernel: reads the block table itself, GQA-aware.

One program per (sequence, KV head) handles that head's whole group of query heads, so each key
and value row is read from memory once per group, not once per query head. The program walks
the sequence's context in tiles of `BLOCK_N` tokens: it looks each token's block up in the
block table, loads the keys of that tile, and keeps an online softmax in fp32. Sequence lengths
and block tables are read on the device, so the launch needs nothing from the host beyond
shapes, and a CUDA graph captures it for any mix of lengths.

The kernel is jitted on first use, not at import: ``triton.jit`` decides at decoration time
whether it compiles for a GPU or runs in Triton's interpreter (``TRITON_INTERPRET=1``, numpy on
the CPU), and the tests run it both ways in one process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

# Imported on first use (the CPU path never needs them); the kernel reads them as module globals,
# which is also where Triton's interpreter patches the language functions.
triton: Any = None
tl: Any = None

_KERNELS: dict[bool, Any] = {}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _import_triton() -> None:
    global triton, tl
    if triton is None:
        try:
            import triton as triton_module
            import triton.language as language
        except ImportError as exc:
            raise RuntimeError("the paged decode kernel needs triton (pip install triton)") from exc
        triton, tl = triton_module, language


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _paged_decode_kernel(
    q_ptr,
    kv_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,
    scale,
    stride_qn,
    stride_qh,
    stride_kv_kind,
    stride_kv_head,
    stride_kv_slot,
    stride_table,
    stride_on,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * stride_qn + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = kv_ptr + kv_head * stride_kv_head
    v_base = k_base + stride_kv_kind
    q = (q.to(tl.float32) * scale).to(kv_ptr.dtype.element_ty)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.full([GROUP_PAD], 0.0, dtype=tl.float32)
    acc = tl.full([GROUP_PAD, DIM_PAD], 0.0, dtype=tl.float32)
    for start in range(0, length, BLOCK_N):
        t = start + tl.arange(0, BLOCK_N)
        t_ok = t < length
        block = tl.load(tables_ptr + seq * stride_table + t // BLOCK_SIZE, mask=t_ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE
        rows = slot[:, None] * stride_kv_slot + d[None, :]
        ok = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + rows, mask=ok, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows, mask=ok, other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + seq * stride_on + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None] & d_ok[None, :],
    )


def _kernel() -> Any:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret not in _KERNELS:
        log.debug("building the paged decode kernel (interpreter: %s)", interpret)
        _import_triton()
        _KERNELS[interpret] = triton.jit(_paged_decode_kernel)
    return _KERNELS[interpret]


def paged_decode_attention(
    q: torch.Tensor,  # (n, H, D), last dim contiguous
    kv_layer: torch.Tensor,  # (2, Hkv, num_slots, D), the layer's pool (see KVCache)
    block_tables: torch.Tensor,  # (n, max_blocks) int32
    context_lens: torch.Tensor,  # (n,) int32, >= 1
    block_size: int,
    scale: float,
    block_n: int = 32,
) -> torch.Tensor:
    """Decode attention of one query token per sequence over its paged context: (n, H, D)."""
    n, heads, dim = q.shape
    _, kv_heads, _, kv_dim = kv_layer.shape
    if kv_dim != dim or heads % kv_heads:
        raise ValueError(f"query heads {heads}x{dim} do not fit KV heads {kv_heads}x{kv_dim}")
    if q.stride(2) != 1 or kv_layer.stride(3) != 1:
        raise ValueError("paged decode needs the head dimension contiguous in q and the KV pool")
    group = heads // kv_heads
    out = torch.empty((n, heads, dim), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    _kernel()[(n, kv_heads)](
        q,
        kv_layer,
        block_tables,
        context_lens,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        kv_layer.stride(0),
        kv_layer.stride(1),
        kv_layer.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        # tl.dot needs at least 16 rows and columns; the padded rows are masked and cost nothing
        # that matters in a memory-bound decode.
        GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=dim,
        DIM_PAD=max(16, _next_pow2(dim)),
        BLOCK_SIZE=block_size,
        BLOCK_N=max(16, block_n),
        IEEE=q.dtype == torch.float32,
    )
    return out
