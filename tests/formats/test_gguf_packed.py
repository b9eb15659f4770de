"""Quantized GGUF matrices read as group-32 integer codes: exact where the format allows, bounded
where it is requantized, and loaded packed (rope row order included) from tiny GGUF files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.errors import UnsupportedModelError
from tandem.formats.dequant import dequantize
from tandem.formats.gguf_file import GGUFFile
from tandem.formats.gguf_packed import PACKABLE_TYPES, AffineCodes, read_affine
from tandem.formats.loader import load_gguf
from tandem.formats.tiny import TinySpec, write_tiny_gguf

T = GGMLQuantizationType
EXACT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K]
REQUANTIZED = [T.Q2_K, T.Q3_K, T.Q6_K]
ONE_PLANE = {T.Q4_0, T.Q4_1, T.Q4_K}


def _tiny(tmp_path: Path, qtype: GGMLQuantizationType, **kw: object) -> Path:
    big = GGML_QUANT_SIZES[qtype][0] == 256  # K-quant rows must hold whole 256-weight blocks
    spec = TinySpec(hidden=256, ffn=512, qtype=qtype, **kw) if big else TinySpec(qtype=qtype, **kw)
    return write_tiny_gguf(tmp_path / f"{qtype.name}.gguf", spec)


def _matrix(path: Path, name: str) -> tuple[np.ndarray, GGMLQuantizationType, tuple[int, ...]]:
    gf = GGUFFile(path)
    info = gf.tensors[name]
    return gf.raw(name), info.ggml_type, info.shape


def test_every_quantized_type_has_a_packed_form() -> None:
    assert set(EXACT) | set(REQUANTIZED) == PACKABLE_TYPES


@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
def test_codes_reproduce_the_file_weights_exactly(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    raw, qt, shape = _matrix(_tiny(tmp_path, qtype), "blk.0.ffn_up.weight")
    codes = read_affine(raw, qt, shape)
    assert codes.exact and codes.qtype == qtype
    assert codes.codes.dtype == torch.int8 and codes.shape == shape
    assert codes.planes == (1 if qtype in ONE_PLANE else 2)
    if codes.planes == 1:
        assert int(codes.codes.min()) >= 0 and int(codes.codes.max()) <= 15
    want = dequantize(raw, qt, shape)
    torch.testing.assert_close(codes.dequantize(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("qtype", REQUANTIZED, ids=lambda t: t.name)
def test_requantized_types_stay_within_half_a_step(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    raw, qt, shape = _matrix(_tiny(tmp_path, qtype), "blk.0.ffn_down.weight")
    codes = read_affine(raw, qt, shape)
    assert not codes.exact and codes.planes == 2
    want = dequantize(raw, qt, shape)
    err = (codes.dequantize() - want).abs().view(shape[0], -1, 32).amax(-1)
    step = want.abs().view(shape[0], -1, 32).amax(-1) / 127  # symmetric int8 per group of 32
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-12).all()), float((err / step).max())
    # Several times below the rounding of the format itself (about 1.6% for 6-bit codes).
    rel = float((codes.dequantize() - want).norm() / want.norm())
    print(f"{qtype.name} requantized to int8 g32: relative error {rel:.2e}")
    assert rel < 5e-3


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_packed_loading_keeps_matrices_quantized(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    path = _tiny(tmp_path, qtype, tie_embeddings=False)
    dense = load_gguf(path)
    packed = load_gguf(path, dtype=torch.bfloat16, packed=True)
    assert packed.tensors.keys() == dense.tensors.keys()
    for name, t in packed.tensors.items():
        ref = dense.tensors[name]
        assert isinstance(ref, torch.Tensor)
        if ref.dim() == 1:  # norms stay dense, in the compute dtype
            assert isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16, name
            continue
        assert isinstance(t, AffineCodes) and t.qtype == qtype, name
        # Same rows in the same order: llama's Q/K rows are un-permuted in the codes too.
        bound = 1e-6 if t.exact else 1 / 250
        assert float((t.dequantize() - ref).abs().max()) <= bound * float(ref.abs().max()), name


def test_float_tensors_have_no_packed_form() -> None:
    with pytest.raises(UnsupportedModelError, match="F16"):
        read_affine(np.zeros(64, dtype=np.float16), T.F16, (2, 32))


def test_bad_sizes_name_the_type_and_shape() -> None:
    _, size = GGML_QUANT_SIZES[T.Q4_1]
    with pytest.raises(ValueError, match=r"Q4_1 tensor of shape \(2, 64\) needs 80 bytes, got 60"):
        read_affine(np.zeros(3 * size, dtype=np.uint8), T.Q4_1, (2, 64))
    with pytest.raises(ValueError, match="Q8_0 tensor row length 48"):
        read_affine(np.zeros(68, dtype=np.uint8), T.Q8_0, (1, 48))
    with pytest.raises(ValueError, match="matrices"):
        read_affine(np.zeros(size, dtype=np.uint8), T.Q4_1, (32,))
