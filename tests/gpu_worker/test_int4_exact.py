"""The exact int4 kernel (cpu_kernels.Int4Matmul): torch's pack read with fp32 activations and
fp16/fp32 scales, against float64 on the file's own weights, and the torch kernel kept beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.formats.dequant import dequantize
from tandem.formats.gguf_file import GGUFFile
from tandem.formats.gguf_packed import AffineCodes, read_affine
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.gpu_worker.model import cpu_kernels, quant_linear
from tandem.gpu_worker.model.quant_linear import Int4Planes, QuantLinear, int4_kernel_available

T = GGMLQuantizationType

pytestmark = pytest.mark.skipif(
    not (int4_kernel_available() and cpu_kernels.int4_pack_is_blocked()),
    reason="this torch packs int4 weights in a layout the exact kernel does not read",
)

QTYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[GGMLQuantizationType, Path]:
    d = tmp_path_factory.mktemp("exact")
    out = {}
    for qtype in QTYPES:
        big = GGML_QUANT_SIZES[qtype][0] == 256
        spec = TinySpec(layers=1, qtype=qtype, **({"hidden": 256, "ffn": 512} if big else {}))
        out[qtype] = write_tiny_gguf(d / f"{qtype.name}.gguf", spec)
    return out


def _linear(path: Path, exact_scales: bool = False) -> tuple[QuantLinear, AffineCodes, torch.Tensor]:
    gf = GGUFFile(path)
    info = gf.tensors["blk.0.ffn_gate.weight"]
    raw = gf.raw("blk.0.ffn_gate.weight")
    codes = read_affine(raw, info.ggml_type, info.shape)
    return QuantLinear([codes], exact_scales=exact_scales), codes, dequantize(raw, info.ggml_type, info.shape)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 64])
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_exact_kernel_matches_float64(tiny_files: dict, qtype: GGMLQuantizationType, rows: int) -> None:
    """Every code, plane and group scale as the file holds it: only fp32's own rounding remains
    (about 1e-7 relative; bf16 activations and scales gave 2e-3 to 7e-3)."""
    lin, codes, w = _linear(tiny_files[qtype])
    (seg,) = lin.segments
    assert isinstance(seg, Int4Planes) and seg.exact_pairs is not None and seg.scales_zeros is None
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows))
    got = lin(x)
    want = x.double() @ codes.dequantize(torch.float64).T
    assert got.dtype == torch.float32 and got.shape == (rows, w.shape[0])
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err < 1e-5, f"{qtype.name}, {rows} rows: relative error {err:.2e}"


def _codes(n: int, k: int, scale: torch.Tensor, bits: int = 4) -> AffineCodes:
    q = torch.randint(0, 16, (n, k), dtype=torch.int8, generator=torch.Generator().manual_seed(n))
    return AffineCodes(q, scale, -8 * scale, bits, T.Q4_0, exact=True)


def test_pairs_are_fp16_only_where_fp16_holds_them() -> None:
    halves = torch.full((128, 2), 0.0078125)
    assert Int4Planes([_codes(128, 64, halves)]).exact_pairs.dtype == torch.float16
    thirds = torch.full((128, 2), 1 / 3)  # not an fp16 number: the kernel gets fp32 pairs
    plane = Int4Planes([_codes(128, 64, thirds)])
    assert plane.exact_pairs.dtype == torch.float32
    x = torch.randn(1, 64)
    want = x.double() @ plane_weights(thirds).T
    assert float((plane(x).double() - want).abs().max() / want.abs().max()) < 1e-6


def plane_weights(scale: torch.Tensor) -> torch.Tensor:
    return _codes(128, 64, scale).dequantize(torch.float64)


def test_rows_not_in_blocks_of_64_keep_the_torch_kernel() -> None:
    plane = Int4Planes([_codes(80, 64, torch.full((80, 2), 0.01))], exact_scales=True)
    assert plane.exact_pairs is None and plane.scales_zeros is not None
    assert plane.residual_scales_zeros is not None  # the second call stands in for exactness
    assert plane(torch.randn(3, 64)).shape == (3, 80)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_big_inputs_get_torch_pairs_made_from_the_exact_ones(
    tiny_files: dict, qtype: GGMLQuantizationType
) -> None:
    """Past the exact kernel's rows torch's kernel runs with the bf16 pairs it always had, made on
    demand so the weight holds one set of scales."""
    lin, codes, _ = _linear(tiny_files[qtype], exact_scales=True)
    (seg,) = lin.segments
    pad = seg.exact_pairs.shape[0] * 64 - seg.out_features
    built = quant_linear._pad_pairs(seg._scales_zeros(codes.scale, codes.offset), pad)
    assert torch.equal(seg._bf16_pairs(), built)
    big = torch.randn(quant_linear._EXACT_SCALES_MAX_ROWS + 1, codes.shape[1])
    assert torch.equal(lin(big), seg._mm(torch.cat([big] * seg.planes, 1).to(torch.bfloat16), built).float())


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_the_threaded_kernel_gives_the_serial_ones_result(
    tiny_files: dict, qtype: GGMLQuantizationType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker of several threads spreads the blocks of 64 output rows over them: each block is
    the same arithmetic in the same order, so the outputs are equal bit for bit."""
    lin, codes, _ = _linear(tiny_files[qtype])
    x = torch.randn(5, codes.shape[1], generator=torch.Generator().manual_seed(5))
    serial = lin(x)
    monkeypatch.setattr(cpu_kernels._Launch, "parallel", True)
    assert torch.equal(lin(x), serial)
