"""RMSNorm as numba kernels for the CPU (see cpu_kernels.rms_norm for why).

Module-level functions so numba caches their machine code on disk; imported only where they run.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(fastmath=True, inline="always")
def _norm_row(x, i, w, eps, out):
    dim = x.shape[1]
    ss = np.float32(0.0)
    for d in range(dim):
        ss += x[i, d] * x[i, d]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(dim) + eps)
    for d in range(dim):
        out[i, d] = x[i, d] * inv * w[d]


@njit(fastmath=True, cache=True)
def rms_norm(x, w, eps, out):
    """``out = x / rms(x) * w`` row by row, fp32 statistics."""
    for i in range(x.shape[0]):
        _norm_row(x, i, w, eps, out)


@njit(fastmath=True, cache=True)
def add_rms_norm(x, delta, w, eps, out):
    """``x += delta`` in place, then ``out`` = RMSNorm of the sum."""
    for i in range(x.shape[0]):
        for d in range(x.shape[1]):
            x[i, d] += delta[i, d]
        _norm_row(x, i, w, eps, out)
