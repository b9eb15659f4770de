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
from tandem.gpu_worker.model.attention import write_kv


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


def rope_and_store(
    qkv: torch.Tensor,
    q_size: int,
    head_dim: int,
    rope: tuple[torch.Tensor, torch.Tensor],
    kv_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotate the q and k heads of the fused QKV output `qkv` (T, q + 2 kv) in place, then write
    its k and v heads to the cache at `slot_mapping`: one kernel on the CPU."""
    if cpu_kernels.rope_applies(qkv, kv_layer):
        cpu_kernels.rope_and_store(qkv, q_size, *rope, kv_layer, slot_mapping)
        return
    kv_size = (qkv.shape[1] - q_size) // 2
    rotate_half_(qkv[:, : q_size + kv_size].unflatten(1, (-1, head_dim)), *rope)
    write_kv(kv_layer, qkv[:, q_size:].unflatten(1, (-1, head_dim)), slot_mapping)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`x += delta` in place, then RMSNorm of the sum (fp32 statistics for 16-bit inputs)."""
    if cpu_kernels.norm_applies(x, weight) and delta.dtype == x.dtype and delta.stride(1) == 1:
        return cpu_kernels.add_rms_norm_(x, delta, weight, eps)
    x.add_(delta)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)
