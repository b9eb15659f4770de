"""Elementwise steps of a decoder layer done in place, so a decode step launches fewer kernels.

Per layer, the eager forward used to spend most of its launches on small elementwise ops: rope
as two gathers of the cos/sin table plus ten ops for q and again for k, and a fresh tensor for
every residual sum. Here the cos/sin rows are gathered once per step, q and k are rotated
together inside the fused QKV output, and residual sums land in the running hidden state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.gpu_worker.model import cpu_kernels


def rotate_half_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half rope of `x` (T, heads, D) in place; `cos`, `sin` (T, D/2) in fp32.

    The math runs in fp32 whatever the compute dtype: a bf16 rotation drifts at long positions.
    """
    half = x.shape[-1] // 2
    xf = x if x.dtype == torch.float32 else x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    t = x2 * s  # the old x2, needed after x2 is overwritten
    x2.mul_(c).addcmul_(x1, s)
    x1.mul_(c).sub_(t)
    if xf is not x:
        x.copy_(xf)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x += delta` in place, then RMSNorm of the sum (fp32 statistics for 16-bit inputs)."""
    if cpu_kernels.norm_applies(x, weight) and delta.dtype == x.dtype and delta.stride(1) == 1:
        return cpu_kernels.add_rms_norm_(x, delta, weight, eps)
    x.add_(delta)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)
