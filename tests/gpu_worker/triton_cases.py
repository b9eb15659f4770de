"""Checks of the Triton paged decode kernel against SDPA, for any device.

Run as a script (``TRITON_INTERPRET=1 python tests/gpu_worker/triton_cases.py``) they check the
kernel on the CPU through Triton's interpreter; test_triton_attention.py does that in a child
process, because Triton reads TRITON_INTERPRET once, when it is first imported. On a GPU,
test_gpu_launch.py calls the same functions with the compiled kernel.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tandem.formats.model_config import ModelConfig
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata, PagedKernel, paged_attention
from tandem.gpu_worker.model.triton_attention import paged_decode_attention

BLOCK = 4

# (heads, kv heads, head dim, dtype, tolerance)
CASES = [
    (4, 2, 16, torch.float32, 1e-5),  # GQA, groups of 2
    (6, 2, 32, torch.float32, 1e-5),  # groups of 3: not a power of two
    (4, 4, 16, torch.float32, 1e-5),  # plain MHA
    (8, 1, 24, torch.float16, 2e-2),  # MQA, head_dim not a power of two, 16-bit pool
]
# Triton's interpreter computes bf16 wrongly (it reads the raw bits): bf16 is checked on GPUs only.
GPU_CASES = [(4, 2, 64, torch.bfloat16, 2e-2), (32, 8, 128, torch.bfloat16, 2e-2)]


def pool(
    heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str, block: int = BLOCK
) -> KVCache:
    cfg = ModelConfig("llama", 1, heads * head_dim, 64, heads, kv_heads, head_dim, 32, 512, 1e-5, 1e4, True)
    kv = KVCache.allocate(cfg, 48, block, dtype, device)
    kv.layers[0].copy_(torch.randn(kv.layers[0].shape, generator=torch.Generator().manual_seed(0)))
    return kv


def sdpa_reference(
    q: torch.Tensor, kv: KVCache, tables: np.ndarray, lens: list[int], scale: float
) -> torch.Tensor:
    block = kv.block_size
    rows = []
    for i, n in enumerate(lens):
        j = np.arange(n)
        slots = torch.from_numpy(tables[i, j // block] * block + j % block).to(q.device)
        k = kv.layers[0][0][:, slots].float()[None]  # (1, Hkv, n, D)
        v = kv.layers[0][1][:, slots].float()[None]
        o = F.scaled_dot_product_attention(q[i].float()[None, :, None], k, v, scale=scale, enable_gqa=True)
        rows.append(o[0, :, 0])
    return torch.stack(rows)


def scattered_tables(lens: list[int], num_blocks: int, block: int = BLOCK) -> np.ndarray:
    """Blocks scattered through the pool; each row padded with stale ids past its own blocks."""
    rng = np.random.default_rng(1)
    perm = rng.permutation(num_blocks)
    tables = rng.integers(0, num_blocks, size=(len(lens), -(-max(lens) // block) + 2))
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block)
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    return tables


def check_kernel_matches_sdpa(
    heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, tol: float, device: str = "cpu"
) -> None:
    kv = pool(heads, kv_heads, head_dim, dtype, device)
    lens = [1, 3, 4, 5, 31, 32, 33, 70]  # across tile and block edges
    tables = scattered_tables(lens, kv.num_blocks)
    q = torch.randn(len(lens), heads, head_dim, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    scale = head_dim**-0.5
    got = paged_decode_attention(
        q,
        kv.layers[0],
        torch.from_numpy(tables.astype(np.int32)).to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
        BLOCK,
        scale,
        block_n=16,
    )
    want = sdpa_reference(q, kv, tables, lens, scale)
    assert got.shape == (len(lens), heads, head_dim) and got.dtype == dtype, (got.shape, got.dtype)
    err = (got.float() - want).abs().max().item()
    assert err < tol, f"kernel vs SDPA: {err:.3g} >= {tol}"
    # The portable path (what the CPU runs) must agree with the kernel on the same batch.
    meta = AttentionMetadata.build(
        np.array(lens) - 1, np.ones(len(lens), dtype=np.int64), np.array(lens), tables, BLOCK, device
    )
    err = (paged_attention(q, kv, 0, meta, scale).float() - got.float()).abs().max().item()
    assert err < tol, f"kernel vs chunked decode path: {err:.3g} >= {tol}"


def check_model_decode_path(device: str = "cpu") -> None:
    """Metadata planned for the kernel routes the decode rows of a mixed step through it."""
    kv = pool(4, 2, 16, torch.float32, device)
    tables = np.arange(40).reshape(4, 10)
    qlens, ctx = np.array([1, 5, 1, 1]), np.array([9, 5, 2, 17])
    positions = np.concatenate([np.arange(c - q, c) for q, c in zip(qlens, ctx, strict=True)])
    q = torch.randn(int(qlens.sum()), 4, 16, generator=torch.Generator().manual_seed(3)).to(device)
    chunked = AttentionMetadata.build(positions, qlens, ctx, tables, BLOCK, device)
    paged = AttentionMetadata.build(
        positions, qlens, ctx, tables, BLOCK, device, paged_kernel=PagedKernel.TRITON
    )
    assert paged.paged is not None and paged.paged.n == 3 and not paged.decode_chunks
    want = paged_attention(q, kv, 0, chunked, 0.25)
    err = (paged_attention(q, kv, 0, paged, 0.25) - want).abs().max().item()
    assert err < 1e-5, f"paged vs chunked step: {err:.3g}"


def check_worker_paths_with_kernel(tmp: Path) -> None:
    """The worker's two kernel paths on the CPU: an eager launch planned for the paged kernel, and
    the decode-graph step body (padding rows on the scratch block), against the chunked path."""
    from step_driver import Seq, make_runner, tokens_of, write_step

    from tandem.formats.tiny import TinySpec, write_tiny_gguf
    from tandem.gpu_worker.cuda_graphs import DecodeGraphs
    from tandem.gpu_worker.runner import ModelRunner

    model = write_tiny_gguf(tmp / "k.gguf", TinySpec(seed=7))
    (ref, ring), (paged, other) = make_runner(model), make_runner(model)
    other.unlink()
    try:
        paged._paged_kernel = PagedKernel.TRITON
        width = -(-paged.cfg.context_length // 16)
        graphs = DecodeGraphs(paged, [4], width, paged_kernel=True, capture=False)
        slot = ring.slot(0)
        seqs = {r: [Seq(i, [2 * i + 1, 2 * i + 2], prompt_len=3 + 5 * i) for i in range(3)] for r in "rp"}
        prompts = [list(range(10, 10 + s.prompt_len)) for s in seqs["r"]]

        def launch(runner: ModelRunner, r: str, step: int, inputs: list[list[int]]) -> list[int]:
            bell = write_step(slot, step, list(zip(seqs[r], inputs, strict=True)))
            return tokens_of(runner, runner.launch(slot, bell, 0.0))

        launch(ref, "r", 0, prompts)
        launch(paged, "p", 0, prompts)
        refs = [[-1 - i] for i in range(3)]
        for step in range(1, 6):
            want = launch(ref, "r", step, refs)
            bell = write_step(slot, step, list(zip(seqs["p"], refs, strict=True)))
            if step % 2:  # alternate the eager paged launch and the graph body
                got = tokens_of(paged, paged.launch(slot, bell, 0.0))
            else:
                out = graphs.try_launch(slot.prefixes(bell.num_tokens, bell.num_seqs), bell)
                assert out is not None
                got = out[0].tolist()
            assert got == want, (step, got, want)
    finally:
        ring.unlink()


def run_all(device: str = "cpu") -> int:
    cases = CASES + (GPU_CASES if device.startswith("cuda") else [])
    for case in cases:
        check_kernel_matches_sdpa(*case, device=device)
    check_model_decode_path(device)
    n = len(cases) + 1
    if device == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            check_worker_paths_with_kernel(Path(tmp))
        n += 1
    return n


if __name__ == "__main__":
    print(f"ok {run_all(sys.argv[1] if len(sys.argv) > 1 else 'cpu')} cases")
