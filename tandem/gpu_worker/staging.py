"""One upload per step: the step's host arrays packed into a staging buffer, copied in one go.

On a GPU the staging buffers are pinned and the copy is ``non_blocking``, so the host never waits
for the device between the doorbell and the launch. Buffers rotate (three of them): the host
fills the next one while the copies of the steps before may still be queued on the stream. Each
buffer's copy records an event, and a buffer is only refilled once its event has passed, which
the worker loop's one-step-in-flight pipeline already guarantees, so the wait never blocks.

On the CPU the "device" tensors are views of the staging buffer itself: no second copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

log = logging.getLogger(__name__)

_ALIGN = 64  # every array starts on a cache line, so any dtype view of the bytes is aligned
_DEPTH = 3


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def pack_offsets(arrays: dict[str, np.ndarray]) -> tuple[dict[str, int], int]:
    """Byte offset of each array in a packed buffer, and the buffer's length."""
    offsets: dict[str, int] = {}
    pos = 0
    for name, arr in arrays.items():
        offsets[name] = pos
        pos += (arr.nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, pos


def views(
    buf: torch.Tensor, arrays: dict[str, np.ndarray], offsets: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Typed tensors over `buf` (uint8) at `offsets`, shaped like `arrays`."""
    out = {}
    for name, arr in arrays.items():
        off = offsets[name]
        out[name] = buf[off : off + arr.nbytes].view(torch_dtype(arr.dtype)).view(arr.shape)
    return out


def fill(host: np.ndarray, arrays: dict[str, np.ndarray], offsets: dict[str, int]) -> None:
    for name, arr in arrays.items():
        off = offsets[name]
        host[off : off + arr.nbytes] = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)


@dataclass
class _Buffer:
    host: torch.Tensor | None = None
    device: torch.Tensor | None = None
    event: torch.cuda.Event | None = field(default=None, repr=False)


class StepStaging:
    def __init__(self, device: torch.device, initial_bytes: int = 1 << 20) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        self._initial = initial_bytes
        self._bufs = [_Buffer() for _ in range(_DEPTH)]
        self._next = 0

    def _ensure(self, buf: _Buffer, nbytes: int) -> None:
        if buf.host is not None and buf.host.numel() >= nbytes:
            return
        size = max(nbytes, self._initial, 0 if buf.host is None else 2 * buf.host.numel())
        # A replaced pinned buffer whose copy is still queued stays alive: torch's pinned-memory
        # allocator holds it until the copy that used it has run.
        buf.host = torch.empty(size, dtype=torch.uint8, pin_memory=self.on_gpu)
        buf.device = torch.empty(size, dtype=torch.uint8, device=self.device) if self.on_gpu else buf.host
        log.debug("staging buffer grown to %d bytes", size)

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Device tensors holding `arrays`, after one host-to-device copy (none on the CPU)."""
        buf = self._bufs[self._next]
        self._next = (self._next + 1) % _DEPTH
        if buf.event is not None and not buf.event.query():
            buf.event.synchronize()  # only when more steps are in flight than the loop allows
        offsets, nbytes = pack_offsets(arrays)
        self._ensure(buf, nbytes)
        assert buf.host is not None and buf.device is not None
        fill(buf.host.numpy(), arrays, offsets)
        if self.on_gpu:
            buf.device[:nbytes].copy_(buf.host[:nbytes], non_blocking=True)
            if buf.event is None:
                buf.event = torch.cuda.Event()
            buf.event.record()
        return views(buf.device, arrays, offsets)
