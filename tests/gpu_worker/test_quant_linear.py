"""QuantLinear's kernel paths against the float32 reference: int4 planes (one and two), padded rows,
mixed parts, the dense copy above the calibrated row count, on the weights of tiny GGUF files."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.formats.dequant import dequantize
from tandem.formats.gguf_file import GGUFFile
from tandem.formats.gguf_packed import AffineCodes, read_affine
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.gpu_worker.model import quant_linear
from tandem.gpu_worker.model.layers import Linear
from tandem.gpu_worker.model.quant_linear import (
    DenseRows,
    Int4Planes,
    QuantLinear,
    int4_kernel_available,
    make_linear,
)

T = GGMLQuantizationType

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="this torch has no CPU int4 kernel")

# Relative error (max |y - ref| / max |ref|) of one matmul against float32 on the file's exact
# weights. bf16 rounds the activations, the output and the group scales (each ~2^-9 relative);
# the requantized types add their int8 rounding. Measured here: 2e-3 to 7e-3 for the exact types,
# up to 1e-2 for the requantized ones.
BOUNDS = {
    T.Q4_0: 1e-2,
    T.Q4_1: 1e-2,
    T.Q5_0: 1e-2,
    T.Q5_1: 1e-2,
    T.Q8_0: 1e-2,
    T.Q4_K: 1e-2,
    T.Q5_K: 1e-2,
    T.Q2_K: 1.5e-2,
    T.Q3_K: 1.5e-2,
    T.Q6_K: 1.5e-2,
}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[GGMLQuantizationType, Path]:
    d = tmp_path_factory.mktemp("quant")
    out = {}
    for qtype in BOUNDS:
        big = GGML_QUANT_SIZES[qtype][0] == 256  # K-quant rows hold whole 256-weight blocks
        spec = TinySpec(layers=1, qtype=qtype, **({"hidden": 256, "ffn": 512} if big else {}))
        out[qtype] = write_tiny_gguf(d / f"{qtype.name}.gguf", spec)
    return out


def _weights(path: Path, name: str) -> tuple[AffineCodes, torch.Tensor]:
    gf = GGUFFile(path)
    info = gf.tensors[name]
    raw = gf.raw(name)
    return read_affine(raw, info.ggml_type, info.shape), dequantize(raw, info.ggml_type, info.shape)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("qtype", list(BOUNDS), ids=lambda t: t.name)
def test_int4_path_matches_float32(tiny_files: dict, qtype: GGMLQuantizationType, rows: int) -> None:
    codes, w = _weights(tiny_files[qtype], "blk.0.ffn_gate.weight")
    lin = QuantLinear([codes])
    (seg,) = lin.segments
    assert isinstance(seg, Int4Planes) and seg.planes == codes.planes
    x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows))
    got = lin(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, w.shape[0])
    err = _rel(got, x.to(torch.bfloat16).float() @ w.T)
    assert err < BOUNDS[qtype], f"{qtype.name}: relative error {err:.2e}"
    # fp32 compute (CPUs without bf16) feeds the same kernel and returns fp32.
    assert lin(x).dtype == torch.float32 and _rel(lin(x), x @ w.T) < BOUNDS[qtype]


EXACT = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K]


@pytest.mark.parametrize("qtype", EXACT, ids=lambda t: t.name)
def test_exact_scales_leave_only_the_output_rounding(tiny_files: dict, qtype: GGMLQuantizationType) -> None:
    """The second call adds back what bf16 rounded off the scales: what stays is the bf16 output's
    own rounding (rms ~1.7e-3 relative; with bf16 scales alone 2.2e-3 to 4.5e-3 here)."""
    codes, w = _weights(tiny_files[qtype], "blk.0.ffn_gate.weight")
    x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(0))
    want = x.to(torch.bfloat16).float() @ w.T
    lin = QuantLinear([codes], exact_scales=True)
    got = lin(x)
    assert got.dtype == torch.float32
    rms = float((got - want).norm() / want.norm())
    assert rms < 2e-3, f"{qtype.name}: rms relative error {rms:.2e}"
    # A prefill-sized input (compute-bound, where the second call would double the cost) skips it.
    big = torch.randn(quant_linear._EXACT_SCALES_MAX_ROWS + 1, w.shape[1]).to(torch.bfloat16)
    assert torch.equal(lin(big), QuantLinear([codes])(big))


def _codes(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> AffineCodes:
    return AffineCodes(q, scale, offset, bits, T.Q8_0 if bits == 8 else T.Q4_1, exact=True)


@pytest.fixture
def small_pack_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pack 64 rows at a time, so a 200-row matrix takes four runs (the last one padded)."""
    monkeypatch.setattr(quant_linear, "_PACK_ROWS", 64)
    quant_linear._packing_splits_by_rows.cache_clear()
    yield
    quant_linear._packing_splits_by_rows.cache_clear()


@pytest.mark.parametrize("n", [40, 200])
@pytest.mark.parametrize("bits", [4, 5, 8])
def test_planes_rebuild_every_code_exactly(bits: int, n: int, small_pack_runs: None) -> None:
    """Power-of-two scales make every weight a bf16 number, so the identity's product is W itself:
    any slip in the plane split, the zeros, the padding to 16 rows or the packing in runs of rows
    shows as a mismatch."""
    assert quant_linear._packing_splits_by_rows()
    g = torch.Generator().manual_seed(bits)
    lo, hi = {4: (0, 16), 5: (-16, 16), 8: (-128, 128)}[bits]
    k = 64
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    every = torch.arange(lo, hi, dtype=torch.int8)
    q.view(-1)[: every.numel()] = every  # every code, the extremes included, whatever the draw
    scale = 2.0 ** torch.randint(-9, -3, (n, k // 32), generator=g).float()
    offset = -4 * scale if bits == 4 else torch.zeros_like(scale)
    codes = _codes(q, scale, offset, bits)
    for exact_scales in (False, True):  # bf16-exact scales leave nothing for the second call
        got = QuantLinear([codes], exact_scales=exact_scales)(torch.eye(k, dtype=torch.bfloat16))
        assert torch.equal(got.float().T, codes.dequantize())


def test_mixed_parts_each_get_their_kernel(tiny_files: dict) -> None:
    """A fused linear whose parts differ (4-bit, 8-bit, float rows) runs one call per kind and
    returns the rows in file order."""
    a, wa = _weights(tiny_files[T.Q4_1], "blk.0.attn_q.weight")
    b, wb = _weights(tiny_files[T.Q8_0], "blk.0.attn_k.weight")
    wc = torch.randn(16, wa.shape[1]) * 0.05
    bias = torch.randn(wa.shape[0] + wb.shape[0] + 16)
    lin = QuantLinear([a, b, wc.to(torch.bfloat16)], bias.to(torch.bfloat16))
    assert [type(s) for s in lin.segments] == [Int4Planes, Int4Planes, DenseRows]
    x = torch.randn(3, wa.shape[1])
    want = x @ torch.cat([wa, wb, wc]).T + bias
    assert _rel(lin(x.to(torch.bfloat16)), want) < 1.5e-2


def test_same_kind_parts_share_one_call(tiny_files: dict) -> None:
    q, wq = _weights(tiny_files[T.Q4_0], "blk.0.attn_q.weight")
    k, wk = _weights(tiny_files[T.Q4_0], "blk.0.attn_k.weight")
    lin = QuantLinear([q, k])
    assert len(lin.segments) == 1 and lin.out_features == wq.shape[0] + wk.shape[0]
    x = torch.randn(2, wq.shape[1])
    assert _rel(lin(x.to(torch.bfloat16)), x @ torch.cat([wq, wk]).T) < BOUNDS[T.Q4_0]


def test_dense_copy_serves_rows_from_the_calibrated_count(tiny_files: dict) -> None:
    codes, w = _weights(tiny_files[T.Q8_0], "token_embd.weight")
    lin = QuantLinear([codes])
    dense = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
    lin.use_dense_copy(dense)
    threshold = lin.calibrate(rows=(1, 4, 16), repeats=1)
    assert threshold in (1, 4, 16, math.inf)
    lin.dense_min_rows = 4
    x = torch.randn(4, w.shape[1]).to(torch.bfloat16)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, dense))
    assert torch.equal(lin(x[:3]), lin._packed(x[:3]))
    assert not torch.equal(lin(x[:3]), torch.nn.functional.linear(x[:3], dense))
    with pytest.raises(ValueError, match="does not match"):
        lin.use_dense_copy(torch.nn.Parameter(dense[:-1]))


def test_dense_parts_stay_a_plain_linear() -> None:
    w = torch.randn(8, 32)
    lin = make_linear([w[:4], w[4:]], torch.zeros(8))
    assert isinstance(lin, Linear) and torch.equal(lin.weight, w)
    with pytest.raises(ValueError, match="input width"):
        QuantLinear(
            [
                _codes(torch.zeros(16, 32, dtype=torch.int8), torch.ones(16, 1), torch.zeros(16, 1), 4),
                torch.zeros(16, 64),
            ]
        )


def test_a_layer_dense_copy_is_its_codes_decoded(tiny_files: dict) -> None:
    (cq, wq), (ck, wk) = (_weights(tiny_files[T.Q4_1], f"blk.0.attn_{n}.weight") for n in "qk")
    lin = QuantLinear([cq, ck])
    lin.make_dense_copy(torch.bfloat16)
    assert lin.dense is not None and lin.dense.dtype == torch.bfloat16
    torch.testing.assert_close(lin.dense.float(), torch.cat([wq, wk]), rtol=2**-8, atol=1e-6)
    lin.dense_min_rows = 2
    x = torch.randn(2, wq.shape[1])
    assert torch.equal(lin(x), torch.nn.functional.linear(x.to(torch.bfloat16), lin.dense).float())
    assert torch.equal(lin(x[:1]), lin._packed(x[:1]).float())  # below the count: the packed kernel
    lin.drop_dense_copy()
    assert lin.dense is None and lin.dense_min_rows == math.inf
    lin.release_sources()
    with pytest.raises(RuntimeError, match="released"):
        lin.make_dense_copy(torch.bfloat16)


@pytest.mark.parametrize(
    ("dense_ms", "want"),
    [
        ((3.0, 0.7, 0.7), 2),  # wins by more than the margin from 2 rows on, twice running
        ((3.0, 0.9, 0.9), math.inf),  # faster, but within the margin: not worth the switch
        ((0.5, 3.0, 0.5), 4),  # a win at the last count counts once
    ],
)
def test_dense_rows_need_a_margin_twice_running(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch, dense_ms: tuple[float, ...], want: float
) -> None:
    codes, _ = _weights(tiny_files[T.Q4_0], "blk.0.attn_q.weight")
    lin = QuantLinear([codes])
    lin.make_dense_copy(torch.bfloat16)
    times = iter(t for d in dense_ms for t in (1.0, d))  # packed, then dense, at each row count
    monkeypatch.setattr(quant_linear, "_best_ms", lambda fn, repeats: (fn(), next(times))[1])
    assert quant_linear.choose_dense_rows([lin], rows=(1, 2, 4)) == want


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_the_model_makes_layer_copies_only_within_the_budget(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    from tandem.gpu_worker.model import llama
    from tandem.gpu_worker.runner import build_model

    monkeypatch.setattr(llama, "DENSE_COPY_BUDGET", budget)
    model = build_model(str(tiny_files[T.Q4_0]), "auto", torch.device("cpu"))
    layer_linears = [m for m in model.layers.modules() if isinstance(m, QuantLinear)]
    assert layer_linears and all(m._sources is None for m in model.modules() if isinstance(m, QuantLinear))
    if budget == 0:
        assert all(m.dense is None and m.dense_min_rows == math.inf for m in layer_linears)
    else:  # copies kept from one shared count on, or all dropped
        counts = {m.dense_min_rows for m in layer_linears}
        assert len(counts) == 1
        assert all((m.dense is None) == (counts == {math.inf}) for m in layer_linears)


def test_the_layer_copies_count_in_the_weights_bytes(
    tiny_files: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory plan's weights are what the worker holds: packed codes plus any dense copies."""
    from tandem.gpu_worker.model import llama
    from tandem.gpu_worker.runner import build_model

    path, cpu = str(tiny_files[T.Q4_0]), torch.device("cpu")
    monkeypatch.setattr(llama, "DENSE_COPY_BUDGET", 0)
    packed = build_model(path, "auto", cpu)
    monkeypatch.setattr(llama, "DENSE_COPY_BUDGET", 1 << 30)
    monkeypatch.setattr(llama, "choose_dense_rows", lambda linears: 4)  # the copies win from 4 rows
    copied = build_model(path, "auto", cpu)
    layer_linears = [m for m in copied.layers.modules() if isinstance(m, QuantLinear)]
    elem = 2 if quant_linear.cpu_has_bf16() else 4
    assert packed.dense_copy_bytes == 0
    assert copied.dense_copy_bytes == sum(m.num_weights for m in layer_linears) * elem > 0
    assert copied.weights_bytes == packed.weights_bytes + copied.dense_copy_bytes
