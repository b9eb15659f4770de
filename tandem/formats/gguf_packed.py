"""Quantized GGUF matrices as group-32 integer codes, read from the raw blocks without fp32 weights.

Every integer GGML format stores, for each run of 32 consecutive weights of a row, small integer
codes ``q`` and a scale ``s`` and offset ``o`` with ``w = s * q + o``. ``AffineCodes`` holds
exactly that (int8 codes, float32 ``s`` and ``o`` per group), which a weight-only int4 kernel
reads as one or two 4-bit planes (see tandem.gpu_worker.model.quant_linear).

How each format maps (d, m, dmin, sc, mn are the format's own fields; u its unsigned codes):

- Q4_0 ``d*(u-8)``: q = u, s = d, o = -8d.          Q4_1 ``d*u + m``: q = u, s = d, o = m.
- Q5_0 ``d*(u-16)``: q = u-16, s = d, o = 0.        Q5_1 ``d*u + m``: q = u, s = d, o = m.
- Q8_0 ``d*q``: q as stored, s = d, o = 0.
- Q4_K / Q5_K ``d*sc*u - dmin*mn`` per 32-weight sub-block: q = u, s = d*sc, o = -dmin*mn.

These are exact. Q2_K, Q3_K and Q6_K scale sub-blocks of 16 weights, finer than the kernel's
smallest group of 32, so they are requantized: symmetric 8-bit codes per group of 32
(``s = max|w| / 127``), whose rounding error is several times below the format's own step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.errors import UnsupportedModelError
from tandem.formats.dequant import (
    _as_byte_tensor,
    _bits,
    _bits_of_words,
    _f16,
    _nibbles,
    _scale_min_k4,
    dequantize,
)

__all__ = ["GROUP", "PACKABLE_TYPES", "AffineCodes", "read_affine"]

_T = GGMLQuantizationType

GROUP = 32  # weights per (scale, offset) pair; the int4 kernel's smallest group size

# Blocks decoded per step: bounds the int16/float32 temporaries to a few MiB whatever the matrix.
_CHUNK_BLOCKS = 1 << 14


@dataclass
class AffineCodes:
    """A quantized matrix as ``w[n, k] = scale[n, g] * codes[n, k] + offset[n, g]``, g = k // 32."""

    codes: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, K // 32) float32
    offset: torch.Tensor  # (N, K // 32) float32
    bits: int  # codes fit in [0, 16) when 4, in [-128, 128) when 8 (or 5 for Q5_x)
    qtype: GGMLQuantizationType  # the file's type
    exact: bool  # False when the file's type had to be requantized

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def planes(self) -> int:
        """4-bit planes a kernel needs: codes in [0, 16) fit one, anything wider takes two."""
        return 1 if self.bits == 4 else 2

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights in ``dtype``, decoded a chunk of rows at a time."""
        codes, scale, offset = self.codes, self.scale, self.offset
        n, k = codes.shape
        out = torch.empty((n, k), dtype=dtype)
        step = max(1, (_CHUNK_BLOCKS * GROUP) // max(k, 1))
        for r in range(0, n, step):
            c = codes[r : r + step].view(-1, k // GROUP, GROUP).float()
            w = c.mul_(scale[r : r + step, :, None]).add_(offset[r : r + step, :, None])
            out[r : r + step].copy_(w.view(-1, k))
        return out

    def permute_rows(self, perm: Callable[[torch.Tensor], torch.Tensor]) -> AffineCodes:
        """The same matrix with its rows reordered by ``perm`` (applied to every row-major field)."""
        return AffineCodes(
            perm(self.codes), perm(self.scale), perm(self.offset), self.bits, self.qtype, self.exact
        )


# Each reader takes (n_blocks, type_size) uint8 blocks and returns codes (n_blocks, block) int8,
# scale and offset (n_blocks, block // 32) float32, with w = scale * codes + offset per group.
_Reader = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _q4_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:]).reshape(b.shape[0], 32)
    return q.view(torch.int8), d, -8 * d


def _q4_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:]).reshape(b.shape[0], 32)
    return q.view(torch.int8), d, m


def _q5_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b, 0)
    qh = _bits_of_words(b[:, 2:6])
    ql = _nibbles(b[:, 6:]).reshape(b.shape[0], 32)
    q = (ql | (qh << 4)).view(torch.int8) - 16
    return q, d, torch.zeros_like(d)


def _q5_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, m = _f16(b, 0), _f16(b, 2)
    qh = _bits_of_words(b[:, 4:8])
    ql = _nibbles(b[:, 8:]).reshape(b.shape[0], 32)
    return (ql | (qh << 4)).view(torch.int8), d, m


def _q8_0(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = _f16(b, 0)
    return b[:, 2:].view(torch.int8), d, torch.zeros_like(d)


def _q4_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 256)
    return q.view(torch.int8), d * sc.float(), -(dmin * mn.float())


def _q5_k(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    ql = _nibbles(b[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1, 1)
    return (ql | (qh << 4)).reshape(n, 256).view(torch.int8), d * sc.float(), -(dmin * mn.float())


# (reader, bits of its codes). Q4_0's codes are the unsigned nibbles (offset -8d), which keeps
# them in one 4-bit plane; the signed 5- and 8-bit codes need two.
_READERS: dict[GGMLQuantizationType, tuple[_Reader, int]] = {
    _T.Q4_0: (_q4_0, 4),
    _T.Q4_1: (_q4_1, 4),
    _T.Q5_0: (_q5_0, 5),
    _T.Q5_1: (_q5_1, 5),
    _T.Q8_0: (_q8_0, 8),
    _T.Q4_K: (_q4_k, 4),
    _T.Q5_K: (_q5_k, 5),
}
# Sub-blocks of 16 weights: no exact group-32 form, so these are requantized to 8 bits.
_REQUANTIZED = frozenset({_T.Q2_K, _T.Q3_K, _T.Q6_K})

PACKABLE_TYPES: frozenset[GGMLQuantizationType] = frozenset(_READERS) | _REQUANTIZED


def _requantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 32k) float32 -> symmetric int8 codes per group of 32 (s = max|w| / 127, o = 0)."""
    g = w.view(w.shape[0], -1, GROUP)
    s = g.abs().amax(-1) / 127
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    q = torch.round(g * inv[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(w.shape[0], -1), s, torch.zeros_like(s)


def read_affine(
    raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]
) -> AffineCodes:
    """The quantized 2-D tensor ``raw`` (its stored bytes) of torch-order ``shape`` as codes."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in PACKABLE_TYPES:
        raise UnsupportedModelError(f"GGUF tensor type {qtype.name} has no packed form")
    if len(shape) != 2:
        raise ValueError(f"packed weights are matrices; got a {qtype.name} tensor of shape {shape}")
    rows, cols = (int(s) for s in shape)
    block, type_size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        raise ValueError(f"{qtype.name} tensor row length {cols} is not a multiple of its block size {block}")
    n_blocks = rows * cols // block
    data = _as_byte_tensor(raw)
    if data.numel() != n_blocks * type_size:
        raise ValueError(
            f"{qtype.name} tensor of shape {shape} needs {n_blocks * type_size} bytes, got {data.numel()}"
        )
    blocks = data.view(n_blocks, type_size)
    codes = torch.empty((n_blocks, block), dtype=torch.int8)
    groups = block // GROUP
    scale = torch.empty((n_blocks, groups), dtype=torch.float32)
    offset = torch.empty((n_blocks, groups), dtype=torch.float32)
    if qtype in _READERS:
        reader, bits = _READERS[qtype]
    else:
        # Decoding a chunk to float32 is the only way to requantize; the chunk stays small.
        def reader(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return _requantize_int8(dequantize(b, qtype, (b.shape[0], block)))

        bits = 8
    for start in range(0, n_blocks, _CHUNK_BLOCKS):
        end = min(n_blocks, start + _CHUNK_BLOCKS)
        q, s, o = reader(blocks[start:end])
        codes[start:end].copy_(q)
        scale[start:end].copy_(s.expand(end - start, groups))
        offset[start:end].copy_(o.expand(end - start, groups))
    return AffineCodes(
        codes.view(rows, cols),
        scale.view(rows, cols // GROUP),
        offset.view(rows, cols // GROUP),
        bits,
        qtype,
        exact=qtype in _READERS,
    )
