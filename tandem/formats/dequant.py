"""Vectorized dequantization of raw GGUF tensor bytes into torch tensors.

Every block of a tensor is decoded at once with torch tensor ops (no Python loop per
block), so the work is multi-threaded on CPU and runs unchanged on a GPU when ``raw``
is already a device tensor (ship the small quantized bytes, expand on the device).

The arithmetic mirrors ggml's reference (``gguf.quants``) operation for operation in
float32, so results are bit-identical to ``gguf.quants.dequantize``; a narrower
``dtype`` is produced by rounding that float32 result once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.errors import UnsupportedModelError

__all__ = ["SUPPORTED_TYPES", "dequantize"]

_T = GGMLQuantizationType

# Elements decoded per step on CPU. Big enough that each torch op is worth splitting
# across threads, small enough that a step's temporaries stay in cache (whole-tensor
# temporaries made the 135M default model ~2x slower, mostly first-touch page faults)
# and that the extra memory beyond the output stays a few MiB.
_CHUNK_ELEMENTS = 1 << 20
# A GPU has no such cache to fit and pays a launch per op, so it takes big steps.
_DEVICE_CHUNK_ELEMENTS = 1 << 26


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The little-endian f16 field at byte ``offset`` of every block, as (n, 1) float32."""
    # .contiguous() makes the 2-byte column viewable as f16 whatever the block stride
    # or the buffer's storage offset; it copies only 2 bytes per block.
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, ..., k) packed bytes -> (n, ..., 2, k): low nibbles first, then high nibbles.

    ggml packs element i of a 2k-run in the low nibble of byte i and element k+i in its
    high nibble, so low-then-high along a new axis restores element order.
    """
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2)


def _bits(qh: torch.Tensor, nbits: int, width: int) -> torch.Tensor:
    """(n, ..., k) bytes -> (n, ..., 8 // width, k): field j of each byte along a new axis.

    Field j is ``(byte >> (j * width)) & mask``; putting j on the slower axis matches
    how ggml spreads high bits of consecutive sub-blocks across one byte run.
    """
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=qh.device)
    shifts = shifts.view(*([1] * (qh.dim() - 1)), -1, 1)
    return (qh.unsqueeze(-2) >> shifts) & ((1 << nbits) - 1)


def _bits_of_words(qh: torch.Tensor) -> torch.Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32) with bit j of the word at j."""
    # Bit j of the word is bit j % 8 of byte j // 8, so bit index varies fastest here,
    # unlike _bits(); torch has no shifts on uint32, so this stays in uint8.
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8) uint8.

    Layout (ggml get_scale_min_k4), bytes 0-3 = a, 4-5 = b, 8-11 = c:
    sub-blocks 0-3 use the low 6 bits of a (scale) and b (min); sub-blocks 4-7 take their
    low 4 bits from c (scale: low nibble, min: high nibble) and their top 2 bits from the
    spare top bits of a (scale) and b (min).
    """
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat((a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)), dim=1)
    mn = torch.cat((b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)), dim=1)
    return sc, mn


# Each kernel takes (n_blocks, type_size) uint8 and returns (n_blocks, block_size) float32.


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    return blocks[:, 2:].view(torch.int8).float().mul_(d)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).view(torch.int8).reshape(blocks.shape[0], 32)
    return (q - 8).float().mul_(d)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).reshape(blocks.shape[0], 32)
    return q.float().mul_(d).add_(m)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks, 0)
    qh = _bits_of_words(blocks[:, 2:6])
    ql = _nibbles(blocks[:, 6:]).reshape(blocks.shape[0], 32)
    q = (ql | (qh << 4)).view(torch.int8) - 16
    return q.float().mul_(d)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    qh = _bits_of_words(blocks[:, 4:8])
    ql = _nibbles(blocks[:, 8:]).reshape(blocks.shape[0], 32)
    return (ql | (qh << 4)).float().mul_(d).add_(m)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble scale, high nibble min) | qs[64] | d | dmin
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 0x0F).float()).unsqueeze(-1)
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    # Two 32-byte runs, each holding four 2-bit planes -> 8 runs of 32 = 16 sub-blocks of 16.
    q = _bits(blocks[:, 16:80].reshape(n, 2, 32), 2, 2).reshape(n, 16, 16)
    return (q.float().mul_(dl).sub_(ml)).reshape(n, 256)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask[32] | qs[64] | scales[12] | d
    n = blocks.shape[0]
    d = _f16(blocks, 108)
    sc = blocks[:, 96:108]
    # 16 6-bit scales: low 4 bits are the nibbles of bytes 0-7 (all low nibbles first),
    # high 2 bits are the 2-bit fields of bytes 8-11 (field j of all four bytes, then j+1).
    low = _nibbles(sc[:, 0:8]).reshape(n, 16)
    high = _bits(sc[:, 8:12], 2, 2).reshape(n, 16)
    scales = ((low | (high << 4)).view(torch.int8) - 32).float()
    dl = (d * scales).unsqueeze(-1)
    ql = _bits(blocks[:, 32:96].reshape(n, 2, 32), 2, 2).reshape(n, 16, 16)
    hm = _bits(blocks[:, 0:32], 1, 1).reshape(n, 16, 16)
    # A clear hmask bit means "subtract 4": the high bit is stored inverted.
    q = ql.view(torch.int8) - ((hm ^ 1) << 2).view(torch.int8)
    return q.float().mul_(dl).reshape(n, 256)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qs[128]
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    ml = (dmin * mn.float()).unsqueeze(-1)
    # Four 32-byte runs; each run's low nibbles are one sub-block, its high nibbles the next.
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32)
    return q.float().mul_(dl).sub_(ml).reshape(n, 256)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d | dmin | scales[12] | qh[32] | qs[128]
    n = blocks.shape[0]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).unsqueeze(-1)
    ml = (dmin * mn.float()).unsqueeze(-1)
    ql = _nibbles(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    # Bit j of qh[l] is the fifth bit of element l of sub-block j.
    qh = _bits(blocks[:, 16:48], 1, 1)
    return (ql | (qh << 4)).float().mul_(dl).sub_(ml).reshape(n, 256)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql[128] | qh[64] | scales[16] int8 | d
    n = blocks.shape[0]
    d = _f16(blocks, 208)
    dl = (d * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    # Per 128-element half: ql bytes 0-63 give elements 0-63 (low nibbles) and 64-127
    # (high nibbles); qh bytes 0-31 give the top 2 bits of elements l, l+32, l+64, l+96.
    ql = _nibbles(blocks[:, 0:128].reshape(n, 2, 64)).reshape(n, 8, 32)
    qh = _bits(blocks[:, 128:192].reshape(n, 2, 32), 2, 2).reshape(n, 8, 32)
    q = (ql | (qh << 4)).view(torch.int8) - 32
    return q.reshape(n, 16, 16).float().mul_(dl).reshape(n, 256)


def _bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an f32, so widening is exact.
    return blocks.view(torch.bfloat16).float()


def _f16_elems(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).float()


def _f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)


_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    _T.F32: _f32,
    _T.F16: _f16_elems,
    _T.BF16: _bf16,
    _T.Q8_0: _q8_0,
    _T.Q4_0: _q4_0,
    _T.Q4_1: _q4_1,
    _T.Q5_0: _q5_0,
    _T.Q5_1: _q5_1,
    _T.Q2_K: _q2_k,
    _T.Q3_K: _q3_k,
    _T.Q4_K: _q4_k,
    _T.Q5_K: _q5_k,
    _T.Q6_K: _q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_KERNELS)


def _as_byte_tensor(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Flat uint8 torch view of ``raw``'s bytes, without copying when possible."""
    if isinstance(raw, torch.Tensor):
        t = raw.contiguous().reshape(-1)
        return t if t.dtype == torch.uint8 else t.view(torch.uint8)
    arr = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    # GGUFReader hands out read-only memmap views. Wrapping one without a copy is safe
    # because nothing here writes to the input, and every result is a fresh tensor.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(arr)


def dequantize(
    raw: np.ndarray | torch.Tensor,
    qtype: GGMLQuantizationType,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode a GGUF tensor's stored bytes into a new contiguous ``dtype`` tensor of ``shape``.

    ``raw`` is the tensor data as stored in the file (any numpy/torch dtype; its bytes are
    used), ``shape`` the logical shape in torch order (reversed GGUF ``ne``). The result
    is on ``raw``'s device when ``raw`` is a torch tensor, else on CPU, and never shares
    memory with ``raw``.
    """
    try:
        qtype = GGMLQuantizationType(qtype)
    except ValueError:
        raise UnsupportedModelError(f"unsupported GGUF tensor type {qtype!r}") from None
    kernel = _KERNELS.get(qtype)
    if kernel is None:
        raise UnsupportedModelError(f"unsupported GGUF tensor type {qtype.name}")

    shape = tuple(int(s) for s in shape)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_elements = math.prod(shape)
    # ggml blocks never straddle rows; a row length that is not a whole number of blocks
    # means the shape or type is wrong, not a layout we could decode.
    if shape and shape[-1] % block_size:
        raise ValueError(
            f"{qtype.name} tensor row length {shape[-1]} is not a multiple of its block size {block_size}"
        )
    n_blocks = n_elements // block_size

    data = _as_byte_tensor(raw)
    if data.numel() != n_blocks * type_size:
        raise ValueError(
            f"{qtype.name} tensor of shape {shape} needs {n_blocks * type_size} bytes, got {data.numel()}"
        )
    if block_size == 1 and data.storage_offset() % type_size:
        # Plain float tensors are viewed in place, which needs element-aligned storage.
        data = data.clone()
    blocks = data.view(n_blocks, type_size)

    out = torch.empty((n_blocks, block_size), dtype=dtype, device=data.device)
    chunk = _CHUNK_ELEMENTS if data.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
    step = max(1, chunk // block_size)
    for start in range(0, n_blocks, step):
        # copy_ both rounds float32 to ``dtype`` and, for F32 input, detaches the result
        # from the (possibly read-only, memory-mapped) input buffer.
        out[start : start + step].copy_(kernel(blocks[start : start + step]))
    return out.view(shape)
