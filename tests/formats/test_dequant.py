"""tandem.formats.dequant against gguf's reference numpy dequantizer."""

from __future__ import annotations

import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.errors import UnsupportedModelError
from tandem.formats import dequant
from tandem.formats.dequant import SUPPORTED_TYPES, dequantize

T = GGMLQuantizationType

# Types gguf can encode from floats: exercise them on realistic quantized data.
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]

# Byte offsets of every f16 scale field in a block. Random bytes there could be inf/NaN,
# which would make the comparison meaningless, so those fields get sane values.
F16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    T.Q8_0: (0,),
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}
BLOCK_TYPES = list(F16_FIELDS)

SHAPES = [(1, 256), (3, 512), (5, 768), (2, 3, 256), (256,)]


def _reference(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    ref = gguf.quants.dequantize(raw, qtype)
    return torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).reshape(shape)


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    assert ours.is_contiguous()
    assert torch.isfinite(ref).all(), "test data must give finite reference values"
    # Currently bit-identical; the tolerance only admits fp32 re-association (e.g. FMA).
    scale = float(ref.abs().max()) or 1.0
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6 * scale)


def _random_blocks(qtype: GGMLQuantizationType, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Arbitrary block bytes (every bit pattern of quants and packed scales) with finite f16 scales."""
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        d = rng.uniform(-0.05, 0.05, size=n_blocks).astype(np.float16)
        blocks[:, off : off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def _quantized(qtype: GGMLQuantizationType, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    data = rng.standard_normal(shape).astype(np.float32)
    # A few far-out values so blocks differ widely in scale.
    data.reshape(-1)[:: max(1, data.size // 7)] *= 40
    return gguf.quants.quantize(data, qtype)


def _n_blocks(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape)) // GGML_QUANT_SIZES[qtype][0]


def test_supported_types() -> None:
    expected = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}
    expected |= {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
    assert expected == SUPPORTED_TYPES
    assert isinstance(SUPPORTED_TYPES, frozenset)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_floats_match_reference(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1000 + int(qtype))
    raw = _quantized(qtype, shape, rng)
    _assert_matches(dequantize(raw, qtype, shape), _reference(raw, qtype, shape))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_reference(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2000 + int(qtype) + len(shape) * 31 + shape[-1])
    raw = _random_blocks(qtype, _n_blocks(qtype, shape), rng)
    _assert_matches(dequantize(raw, qtype, shape), _reference(raw, qtype, shape))


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_TYPES), ids=lambda t: t.name)
def test_many_chunks(qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny step size forces many uneven steps, including a short last one.
    monkeypatch.setattr(dequant, "_CHUNK_ELEMENTS", 700)
    rng = np.random.default_rng(3000 + int(qtype))
    shape = (37, 512)
    if qtype in F16_FIELDS:
        raw = _random_blocks(qtype, _n_blocks(qtype, shape), rng)
    else:
        raw = _quantized(qtype, shape, rng)
    _assert_matches(dequantize(raw, qtype, shape), _reference(raw, qtype, shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qtype", [T.F32, T.BF16, T.Q8_0, T.Q4_1, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_output_dtype_is_one_rounding_of_float32(qtype: GGMLQuantizationType, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(4000 + int(qtype))
    shape = (6, 512)
    if qtype in F16_FIELDS:
        raw = _random_blocks(qtype, _n_blocks(qtype, shape), rng)
    else:
        raw = _quantized(qtype, shape, rng)
    out = dequantize(raw, qtype, shape, dtype)
    assert out.dtype == dtype
    assert out.shape == shape
    assert torch.equal(out, _reference(raw, qtype, shape).to(dtype))


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q4_1, T.Q5_K], ids=lambda t: t.name)
def test_input_forms(qtype: GGMLQuantizationType) -> None:
    """Typed arrays, byte arrays, read-only (memmap-like) arrays and torch tensors all work."""
    rng = np.random.default_rng(5000 + int(qtype))
    shape = (4, 256)
    if qtype in F16_FIELDS:
        raw = _random_blocks(qtype, _n_blocks(qtype, shape), rng)
    else:
        raw = _quantized(qtype, shape, rng)
    ref = _reference(raw, qtype, shape)

    readonly = np.array(raw)
    readonly.flags.writeable = False
    forms = [raw, raw.view(np.uint8), readonly, torch.from_numpy(np.array(raw.view(np.uint8)))]
    for form in forms:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = dequantize(form, qtype, shape)
        _assert_matches(out, ref)


def test_result_does_not_alias_input() -> None:
    raw = np.arange(512, dtype=np.float32)
    out = dequantize(raw, T.F32, (2, 256))
    out.zero_()
    assert raw[5] == 5.0


def test_unaligned_float_buffer() -> None:
    # A byte slice at an odd offset cannot be viewed as f32 in place.
    data = np.arange(256, dtype=np.float32)
    buf = np.zeros(data.nbytes + 1, dtype=np.uint8)
    buf[1:] = data.view(np.uint8)
    out = dequantize(torch.from_numpy(buf)[1:], T.F32, (256,))
    assert torch.equal(out, torch.from_numpy(data))


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ4_NL, T.Q8_1, T.Q8_K, T.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type_is_named(qtype: GGMLQuantizationType) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros(type_size * 2, dtype=np.uint8)
    with pytest.raises(UnsupportedModelError, match=f"unsupported GGUF tensor type {qtype.name}"):
        dequantize(raw, qtype, (2, block_size))


def test_unknown_type_number() -> None:
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF tensor type"):
        dequantize(np.zeros(4, dtype=np.uint8), 9999, (1,))  # type: ignore[arg-type]


def test_wrong_byte_count() -> None:
    raw = np.zeros(GGML_QUANT_SIZES[T.Q4_0][1] * 3, dtype=np.uint8)
    with pytest.raises(ValueError, match="needs 72 bytes, got 54"):
        dequantize(raw, T.Q4_0, (2, 64))


def test_row_not_whole_blocks() -> None:
    raw = np.zeros(GGML_QUANT_SIZES[T.Q4_K][1] * 2, dtype=np.uint8)
    with pytest.raises(ValueError, match="not a multiple of its block size 256"):
        dequantize(raw, T.Q4_K, (4, 128))


@pytest.mark.slow
def test_default_model_matches_reference(default_model_path: Path) -> None:
    reader = gguf.GGUFReader(default_model_path)
    seen: set[str] = set()
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))
        ours = dequantize(t.data, t.tensor_type, shape)
        assert torch.equal(ours, _reference(t.data, t.tensor_type, shape)), t.name
        seen.add(t.tensor_type.name)
    # Timing is not asserted: on a shared 2-core box it would only add flakiness.
    assert {"Q4_1", "Q8_0", "F32"} <= seen
