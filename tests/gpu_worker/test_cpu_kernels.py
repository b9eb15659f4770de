"""The CPU's numba kernels: paged decode attention against SDPA, inside mixed steps and in the
worker; RMSNorm (and its residual add), rope with the KV-cache write, against torch's ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from triton_cases import BLOCK, pool, scattered_tables, sdpa_reference

from tandem.gpu_worker.model import cpu_kernels
from tandem.gpu_worker.model.attention import AttentionMetadata, PagedKernel, paged_attention, write_kv
from tandem.gpu_worker.model.fused import add_rms_norm_, rotate_half_
from tandem.gpu_worker.model.layers import RMSNorm

LENS = [1, 3, 4, 5, 31, 32, 33, 70]  # across block edges


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "dtype"),
    [
        (4, 2, 16, torch.float32),  # GQA, groups of 2
        (9, 3, 64, torch.float32),  # groups of 3: the default model's shape
        (4, 4, 16, torch.float32),  # MHA
        (8, 1, 24, torch.bfloat16),  # MQA, a bf16 pool
        (9, 3, 64, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("parallel", [True, False], ids=["prange", "serial"])
# Blocks of 16 rows (32: two halves each) with a head dimension of 16s take the vector kernel.
@pytest.mark.parametrize("block", [BLOCK, 16, 32], ids=lambda b: f"block{b}")
def test_kernel_matches_sdpa(
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    parallel: bool,
    block: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cpu_kernels._Launch, "parallel", parallel)
    kv = pool(heads, kv_heads, head_dim, dtype, "cpu", block)
    tables = scattered_tables(LENS, kv.num_blocks, block)  # stale ids past each row's own blocks
    q = torch.randn(len(LENS), heads, head_dim, generator=torch.Generator().manual_seed(2))
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    tab, lens = torch.from_numpy(tables.astype(np.int32)), torch.tensor(LENS, dtype=torch.int32)
    cpu_kernels.decode_attention(q, kv.layers[0], np.arange(len(LENS)), tab, lens, block, scale, out)
    # bf16 keys and values are converted exactly: the reference reads the same values upcast.
    err = (out - sdpa_reference(q, kv, tables, LENS, scale)).abs().max().item()
    assert err < 1e-5, err


def test_mixed_step_reads_decode_rows_through_the_kernel() -> None:
    """Decode rows between prefill chunks: the kernel writes only its rows, the same as chunks."""
    kv = pool(4, 2, 16, torch.bfloat16, "cpu")
    tables = np.arange(40).reshape(4, 10)
    qlens, ctx = np.array([1, 5, 1, 1]), np.array([9, 5, 2, 17])
    positions = np.concatenate([np.arange(c - q, c) for q, c in zip(qlens, ctx, strict=True)])
    q = torch.randn(int(qlens.sum()), 4, 16, generator=torch.Generator().manual_seed(3))
    chunked = AttentionMetadata.build(positions, qlens, ctx, tables, BLOCK)
    paged = AttentionMetadata.build(positions, qlens, ctx, tables, BLOCK, paged_kernel=PagedKernel.NUMBA)
    assert paged.paged is not None and paged.paged.kernel is PagedKernel.NUMBA and not paged.decode_chunks
    err = (paged_attention(q, kv, 0, paged, 0.25) - paged_attention(q, kv, 0, chunked, 0.25)).abs().max()
    assert err.item() < 1e-5


def test_the_worker_decodes_packed_models_through_it(tmp_path: Path) -> None:
    """--dtype auto on a quantized file: a bf16 cache read by the kernel, tokens as the chunk path's."""
    from gguf import GGMLQuantizationType
    from step_driver import Seq, make_runner, tokens_of, write_step

    from tandem.formats.tiny import TinySpec, write_tiny_gguf

    model = write_tiny_gguf(tmp_path / "q.gguf", TinySpec(seed=7, qtype=GGMLQuantizationType.Q4_0))
    (kernel, ring), (ref, other) = make_runner(model, dtype="auto"), make_runner(model, dtype="auto")
    other.unlink()
    try:
        for runner in (kernel, ref):
            runner.prepare_launch()
        assert kernel.model.has_packed_weights and kernel.kv.dtype == torch.bfloat16
        assert kernel._paged_kernel is PagedKernel.NUMBA
        ref._paged_kernel = None  # the portable chunk path, on the same weights and cache dtype
        slot = ring.slot(0)
        blocks = [[3 * i + 1, 3 * i + 2, 3 * i + 3] for i in range(3)]
        seqs = {r: [Seq(i, blocks[i], prompt_len=4 + 9 * i) for i in range(3)] for r in "kr"}
        prompts = [list(range(10, 10 + s.prompt_len)) for s in seqs["k"]]

        def launch(runner, r: str, step: int, inputs: list[list[int]]) -> list[int]:
            bell = write_step(slot, step, list(zip(seqs[r], inputs, strict=True)))
            return tokens_of(runner, runner.launch(slot, bell, 0.0))

        assert launch(kernel, "k", 0, prompts) == launch(ref, "r", 0, prompts)
        refs = [[-1 - i] for i in range(3)]
        for step in range(1, 12):  # past a block edge for every sequence
            assert launch(kernel, "k", step, refs) == launch(ref, "r", step, refs), step
    finally:
        ring.unlink()


@pytest.mark.parametrize("rows", [1, 5])
def test_rms_norm_matches_torch(rows: int) -> None:
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(rows, 576, generator=g) * 3, torch.randn(576, generator=g)
    norm = RMSNorm(w, 1e-5)
    assert cpu_kernels.norm_applies(x, norm.weight)
    want = F.rms_norm(x, (576,), w, 1e-5)
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)
    wide = torch.randn(rows, 2 * 576, generator=g)
    torch.testing.assert_close(
        norm(wide[:, 576:]), F.rms_norm(wide[:, 576:], (576,), w, 1e-5)
    )  # strided rows
    delta = torch.randn(rows, 576, generator=g)
    summed = x + delta
    got = add_rms_norm_(x, delta, w, 1e-5)
    torch.testing.assert_close(x, summed)  # the residual is updated in place
    torch.testing.assert_close(got, F.rms_norm(summed, (576,), w, 1e-5), rtol=1e-5, atol=1e-5)


def test_norms_of_other_dtypes_stay_with_torch() -> None:
    x = torch.randn(3, 64).bfloat16()
    norm = RMSNorm(torch.ones(64, dtype=torch.bfloat16), 1e-6)
    assert not cpu_kernels.norm_applies(x, norm.weight)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, 1e-6))


def test_warm_up_keeps_the_workers_thread_count() -> None:
    """numba's OpenMP pool shares torch's runtime: starting it once set torch to 2 threads in a
    one-thread worker. Checked in a fresh interpreter (the pool is per process)."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from tandem.gpu_worker.model import cpu_kernels\n"
        "for n in (1, 2):\n"
        "    torch.set_num_threads(n)\n"
        "    torch.zeros(256, 256) @ torch.zeros(256, 256)\n"  # torch's OpenMP started, as in a worker
        "    cpu_kernels.warm_up(torch.bfloat16, n)\n"
        "    print(n, torch.get_num_threads(), cpu_kernels._Launch.parallel)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1", "False", "2", "2", "True"], out.stdout


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "pad"), [(1, 0), (5, 0), (3, 16)], ids=["one", "rows", "padded-view"])
def test_rope_and_store_matches_torch(cache_dtype: torch.dtype, rows: int, pad: int) -> None:
    """Rotated q and k within an ulp of torch's rotation; the cache holds k and v as torch would
    convert them (compared on the kernel's own rotated values, since an ulp can flip a rounding)."""
    heads, kv_heads, dim = 9, 3, 64
    width = (heads + 2 * kv_heads) * dim
    torch.manual_seed(0)
    qkv = (torch.randn(rows, width + pad) * 10)[:, :width]
    cos, sin = torch.randn(rows, dim // 2), torch.randn(rows, dim // 2)
    slots = torch.randperm(40)[:rows]
    want = qkv.clone()
    rotate_half_(want[:, : (heads + kv_heads) * dim].unflatten(1, (-1, dim)), cos, sin)
    kv = torch.zeros(2, kv_heads, 40, dim, dtype=cache_dtype)
    assert cpu_kernels.rope_applies(qkv, kv)
    cpu_kernels.rope_and_store(qkv, heads * dim, cos, sin, kv, slots)
    torch.testing.assert_close(qkv, want, rtol=1e-6, atol=1e-5)
    expected = torch.zeros_like(kv)
    write_kv(expected, qkv[:, heads * dim :].unflatten(1, (-1, dim)), slots)
    assert torch.equal(kv.view(torch.int16), expected.view(torch.int16))
    assert not kv.view(torch.int16)[:, :, [s for s in range(40) if s not in slots.tolist()]].any()


def test_the_cache_write_rounds_bf16_as_torch_does() -> None:
    """Round to nearest even over fp32's range, infinities and the largest finite values included;
    a NaN stays a NaN. The values ride in v, which rope leaves alone."""
    dim = 1024
    x = torch.randn(2 * dim, generator=torch.Generator().manual_seed(1)) * torch.logspace(-40, 38, 2 * dim)
    x[:6] = torch.tensor([float("inf"), -float("inf"), 3.4e38, -3.4e38, 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    x[6] = float("nan")
    qkv = torch.cat([torch.zeros(2 * dim), x]).view(1, -1)[:, : 3 * dim]  # q, k (zeros), then v
    kv = torch.zeros(2, 1, 4, dim, dtype=torch.bfloat16)
    no_turn = torch.ones(1, dim // 2), torch.zeros(1, dim // 2)
    cpu_kernels.rope_and_store(qkv, dim, *no_turn, kv, torch.tensor([2]))
    got, want = kv[1, 0, 2].float(), x[:dim].to(torch.bfloat16).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert got.isnan().sum() == 1 and got.isinf().sum() == want.isinf().sum() >= 2
    assert not kv[0].any()  # k was zeros


@pytest.mark.parametrize("slot", [-1, 40])
def test_rope_and_store_refuses_a_slot_outside_the_pool(slot: int) -> None:
    """torch's indexed copy raised on such a slot; the kernel must not write past the pool either
    (numba does not check indices), and it refuses before touching the rows or the cache."""
    qkv = torch.randn(2, 5 * 8)
    kv = torch.zeros(2, 2, 40, 8, dtype=torch.bfloat16)
    before = qkv.clone()
    with pytest.raises(IndexError, match="outside the cache pool"):
        cpu_kernels.rope_and_store(qkv, 8, torch.randn(2, 4), torch.randn(2, 4), kv, torch.tensor([3, slot]))
    assert torch.equal(qkv, before) and not kv.view(torch.int16).any()
