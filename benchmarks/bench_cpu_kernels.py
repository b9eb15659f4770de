"""The CPU's numba kernels against the torch ops they replace, side by side in one run.

    python benchmarks/bench_cpu_kernels.py                 # default model's shapes, one thread
    python benchmarks/bench_cpu_kernels.py --threads 2 --cases 8x2048

Attention: one decode step's attention over every layer (blocks scattered through the pool),
the portable chunk path (gather + batched matmuls, fp32 cache) against the paged kernel with an
fp32 and a bf16 cache. RMSNorm: one call on fp32 rows, torch's rms_norm against the kernel.
Rope and the cache write: one layer's, torch's ops (fused.rotate_half_, attention.write_kv) against
the kernel, into a bf16 cache. int4: the 120 packed layer matmuls of a step, torch's kernel (with
and without its second call on the attention projections) against the exact kernel.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from tandem.formats.gguf_packed import AffineCodes
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model import cpu_kernels
from tandem.gpu_worker.model.attention import AttentionMetadata, PagedKernel, paged_attention, write_kv
from tandem.gpu_worker.model.fused import rotate_half_
from tandem.gpu_worker.model.quant_linear import Int4Planes

HEADS, KV_HEADS, HEAD_DIM, LAYERS, BLOCK, HIDDEN, FFN = 9, 3, 64, 30, 16, 576, 1536  # SmolLM2-135M


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out * 1000


def attention_ms(batch: int, ctx: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    width = -(-ctx // BLOCK)
    tables = rng.permutation(batch * width).reshape(batch, width).astype(np.int32)
    lens = np.full(batch, ctx)
    q = torch.randn(batch, HEADS + 2 * KV_HEADS, HEAD_DIM)[:, :HEADS]  # a view, as in the fused QKV
    out = {}
    for name, dtype, kernel in (
        ("chunks fp32", torch.float32, None),
        ("kernel fp32", torch.float32, PagedKernel.NUMBA),
        ("kernel bf16", torch.bfloat16, PagedKernel.NUMBA),
    ):
        shape = (2, KV_HEADS, (batch * width + 1) * BLOCK, HEAD_DIM)
        kv = KVCache([torch.randn(shape).to(dtype) for _ in range(LAYERS)], batch * width, BLOCK)
        meta = AttentionMetadata.build(lens - 1, np.ones(batch), lens, tables, BLOCK, paged_kernel=kernel)

        def step(kv: KVCache = kv, meta: AttentionMetadata = meta) -> None:
            for layer in range(LAYERS):
                paged_attention(q, kv, layer, meta, HEAD_DIM**-0.5)

        out[name] = best_ms(step, repeats)
    return out


def norm_us(rows: int, repeats: int) -> dict[str, float]:
    x, w = torch.randn(rows, HIDDEN), torch.randn(HIDDEN)
    calls = 1000

    def loop(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(calls):
                fn()

        return run

    torch_us = best_ms(loop(lambda: F.rms_norm(x, (HIDDEN,), w, 1e-5)), repeats) * 1000 / calls
    kernel_us = best_ms(loop(lambda: cpu_kernels.rms_norm(x, w, 1e-5)), repeats) * 1000 / calls
    return {"torch": torch_us, "kernel": kernel_us}


def rope_us(rows: int, repeats: int) -> dict[str, float]:
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    qkv = torch.randn(rows, q_size + 2 * kv_size)
    cos, sin = torch.randn(rows, HEAD_DIM // 2), torch.randn(rows, HEAD_DIM // 2)
    kv = torch.zeros(2, KV_HEADS, 64 * BLOCK, HEAD_DIM, dtype=torch.bfloat16)
    slots = torch.randperm(64 * BLOCK)[:rows]
    calls = 1000

    def torch_ops() -> None:
        for _ in range(calls):
            rotate_half_(qkv[:, : q_size + kv_size].unflatten(1, (-1, HEAD_DIM)), cos, sin)
            write_kv(kv, qkv[:, q_size:].unflatten(1, (-1, HEAD_DIM)), slots)

    def kernel() -> None:
        for _ in range(calls):
            cpu_kernels.rope_and_store(qkv, q_size, cos, sin, kv, slots)

    runs = (("torch", torch_ops), ("kernel", kernel))
    return {name: best_ms(fn, repeats) * 1000 / calls for name, fn in runs}


def int4_ms(rows_list: list[int], repeats: int) -> dict[int, dict[str, float]]:
    """The 120 packed layer matmuls of a default-model step (random Q4_1 codes, fp16 scales):
    torch's int4 kernel with bf16 scales, the same with its second call on the attention
    projections (what the model ran before the exact kernel), and the exact kernel."""
    gen = torch.Generator().manual_seed(0)
    planes = []
    for n, k in [
        (HEADS * HEAD_DIM + 2 * KV_HEADS * HEAD_DIM, HIDDEN),
        (HIDDEN, HIDDEN),
        (2 * FFN, HIDDEN),
        (HIDDEN, FFN),
    ]:
        for _ in range(LAYERS):
            codes = torch.randint(0, 16, (n, k), dtype=torch.int8, generator=gen)
            scale = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().float()
            offset = (torch.randn(n, k // 32, generator=gen) * 0.05).half().float()
            planes.append(Int4Planes([AffineCodes(codes, scale, offset, 4, GGMLQuantizationType.Q4_1, True)]))
    out = {}
    for rows in rows_list:
        xs = {k: torch.randn(rows, k, generator=gen) for k in (HIDDEN, FFN)}
        xb = {k: x.to(torch.bfloat16) for k, x in xs.items()}

        def torch_kernel(second_call: bool, xb: dict[int, torch.Tensor] = xb) -> None:
            for i, p in enumerate(planes):
                pairs = p._bf16_pairs()
                y = p._mm(xb[p.in_features], pairs)
                if second_call and i < 2 * LAYERS:  # qkv and o; the residual pairs cost the same
                    y.float().add_(p._mm(xb[p.in_features], pairs))

        def exact(xs: dict[int, torch.Tensor] = xs) -> None:
            for p in planes:
                p(xs[p.in_features])

        for p in planes:  # bf16 pairs made once, as a weight without the exact kernel holds them
            p.scales_zeros = p._bf16_pairs()
        runs = (("torch", lambda: torch_kernel(False)), ("torch + second call", lambda: torch_kernel(True)))
        out[rows] = {name: best_ms(fn, repeats) for name, fn in (*runs, ("exact kernel", exact))}
        for p in planes:
            p.scales_zeros = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default="1x128,8x128,8x2048,32x256", help="BATCHxCONTEXT,...")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu_kernels.warm_up(torch.bfloat16, args.threads)
    cpu_kernels.warm_up(torch.float32, args.threads)
    shape = f"{LAYERS} layers of {HEADS}/{KV_HEADS} heads x {HEAD_DIM}"
    print(f"attention, {shape}, {args.threads} thread(s), ms a step")
    for case in args.cases.split(","):
        batch, ctx = (int(v) for v in case.split("x"))
        ms = attention_ms(batch, ctx, args.repeats)
        cells = "  ".join(f"{k} {v:7.1f}" for k, v in ms.items())
        gain = ms["chunks fp32"] / ms["kernel bf16"]
        print(f"  batch {batch:3d} context {ctx:5d}: {cells}  (chunks / bf16 kernel {gain:.2f}x)")
    for rows in (1, 8):
        us = norm_us(rows, args.repeats)
        gain = us["torch"] / us["kernel"]
        cells = f"torch {us['torch']:.1f} us, kernel {us['kernel']:.1f} us"
        print(f"rms_norm of {rows} x {HIDDEN}: {cells} ({gain:.1f}x)")
    if cpu_kernels.int4_pack_is_blocked():
        for rows, ms in int4_ms([1, 2, 8, 32], args.repeats).items():
            cells = ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
            print(f"int4 layer matmuls of a step ({4 * LAYERS}), {rows} row(s), ms: {cells}")
    for rows in (1, 8):
        us = rope_us(rows, args.repeats)
        cells = f"torch {us['torch']:.1f} us, kernel {us['kernel']:.1f} us"
        print(f"rope + cache write of {rows} row(s), one layer: {cells} ({us['torch'] / us['kernel']:.1f}x)")


if __name__ == "__main__":
    main()
