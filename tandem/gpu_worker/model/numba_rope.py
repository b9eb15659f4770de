"""Rope and the KV-cache write of a step as one numba kernel (see cpu_kernels.rope_and_store).

Module-level functions so numba caches their machine code on disk; imported only where they run.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload


def store_heads(kv_rows, kv, slot):
    """``kv_rows`` (2, Hkv, D) fp32 into ``kv[:, :, slot]`` (numba picks the overload)."""
    raise NotImplementedError("numba-only")


@overload(store_heads, inline="always")
def _store_heads(kv_rows, kv, slot):
    if kv.dtype.bitwidth == 16:  # a bf16 cache seen as int16: round to nearest even, as torch does

        def bf16(kv_rows, kv, slot):
            bits = kv_rows.view(np.uint32)
            for a in range(2):
                for h in range(kv.shape[1]):
                    for d in range(kv.shape[3]):
                        u = bits[a, h, d]
                        top = u >> np.uint32(16)
                        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: a quiet NaN
                            r = np.uint32(0x7FC0) | (top & np.uint32(0x8000))
                        else:
                            r = (u + np.uint32(0x7FFF) + (top & np.uint32(1))) >> np.uint32(16)
                        kv[a, h, slot, d] = np.int16(np.uint16(r))

        return bf16

    def f32(kv_rows, kv, slot):
        for a in range(2):
            for h in range(kv.shape[1]):
                for d in range(kv.shape[3]):
                    kv[a, h, slot, d] = kv_rows[a, h, d]

    return f32


@njit(cache=True)  # no fastmath: the same rounding as the torch ops it replaces
def rope_store(qkv, q_size, cos, sin, kv, slots):
    """Rotate-half rope of the q and k heads of every row of ``qkv`` (T, q + 2 kv) in place, then
    each row's k and v heads into ``kv`` (2, Hkv, slots, D) at ``slots[t]``."""
    hkv, head_dim = kv.shape[1], kv.shape[3]
    kv_size = hkv * head_dim
    half = head_dim // 2
    rotated = (q_size + kv_size) // head_dim
    for t in range(qkv.shape[0]):  # before any write: an index out of the pool must not land anywhere
        if slots[t] < 0 or slots[t] >= kv.shape[2]:
            raise IndexError("a KV slot outside the cache pool")
    kv_rows = np.empty((2, hkv, head_dim), dtype=np.float32)
    for t in range(qkv.shape[0]):
        for j in range(rotated):
            base = j * head_dim
            for i in range(half):
                c, s = cos[t, i], sin[t, i]
                x1, x2 = qkv[t, base + i], qkv[t, base + half + i]
                qkv[t, base + i] = x1 * c - x2 * s
                qkv[t, base + half + i] = x2 * c + x1 * s
        for a in range(2):
            for h in range(hkv):
                for d in range(head_dim):
                    kv_rows[a, h, d] = qkv[t, q_size + a * kv_size + h * head_dim + d]
        store_heads(kv_rows, kv, slots[t])
