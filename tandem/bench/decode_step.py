"""Decode-step figures of the bare model, each measured side by side in one run.

- kernels, allocations and views dispatched per layer by one decode step (a TorchDispatchMode
  count, exact and independent of load);
- context scaling: batch-8 decode tok/s at a long context against a short one (the step reads
  only the blocks each sequence owns, so the ratio measures attention cost, not padding);
- host planning time of a batch-256 decode step (numpy from the slot, no per-sequence loop);
- on a GPU: eager launches against CUDA-graph replays per batch size.

No scheduler, no ring, no second process: the same planning, staging and forward the worker
runs, so these are the floor under the pipeline's step times. Weights come from a GGUF file or
are random of a real model's shape (`synthetic_model`), so a GPU run needs no file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tandem.bench.timing import median, ratio
from tandem.formats.model_config import ModelConfig
from tandem.gpu_worker.cuda_graphs import DecodeGraphs
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.llama import LlamaModel
from tandem.gpu_worker.runner import paged_kernel_for, warm_cpu_kernels
from tandem.gpu_worker.staging import StepStaging
from tandem.gpu_worker.step_plan import plan_step, resolve_refs
from tandem.messages import Doorbell

log = logging.getLogger(__name__)

BLOCK_SIZE = 16

# Real models' shapes (weights random): (layers, hidden, ffn, heads, kv heads, vocab).
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (4, 64, 256, 4, 2, 300),
    "smollm2-135m": (30, 576, 1536, 9, 3, 49152),
    "llama-3.2-1b": (16, 2048, 8192, 32, 8, 128256),
    "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128256),
}


def synthetic_model(shape: str, device: torch.device, dtype: torch.dtype, context: int) -> LlamaModel:
    """Random weights of a real model's shape, made on the device (no file, no host copy)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (one of {', '.join(SHAPES)})")
    layers, hidden, ffn, heads, kv_heads, vocab = SHAPES[shape]
    head_dim = hidden // heads
    cfg = ModelConfig(
        "llama", layers, hidden, ffn, heads, kv_heads, head_dim, vocab, context, 1e-5, 1e4, True, name=shape
    )
    gen = torch.Generator(device=device).manual_seed(0)

    def mat(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, device=device, generator=gen) * 0.02).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    w = {"token_embd.weight": mat(vocab, hidden), "output_norm.weight": ones(hidden)}
    for i in range(layers):
        p = f"blk.{i}"
        w |= {
            f"{p}.attn_norm.weight": ones(hidden),
            f"{p}.ffn_norm.weight": ones(hidden),
            f"{p}.attn_q.weight": mat(hidden, hidden),
            f"{p}.attn_k.weight": mat(kv_heads * head_dim, hidden),
            f"{p}.attn_v.weight": mat(kv_heads * head_dim, hidden),
            f"{p}.attn_output.weight": mat(hidden, hidden),
            f"{p}.ffn_gate.weight": mat(ffn, hidden),
            f"{p}.ffn_up.weight": mat(ffn, hidden),
            f"{p}.ffn_down.weight": mat(hidden, ffn),
        }
    return LlamaModel(cfg, w).to(device)


class OpCount(TorchDispatchMode):
    """Ops dispatched: kernels (not views), of which allocations (a fresh output), and views."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = self.allocations = self.views = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.is_view:
            self.views += 1
        else:
            self.kernels += 1
            self.allocations += not any(r.alias_info is not None for r in func._schema.returns)
        return func(*args, **(kwargs or {}))


@dataclass
class _Host:
    """What DecodeGraphs needs of a runner (see cuda_graphs.GraphHost)."""

    model: LlamaModel
    kv: KVCache
    prev_sampled: torch.Tensor
    device: torch.device


class DecodeBatch:
    """`batch` sequences with blocks scattered through the pool, stepped as pure decode steps."""

    def __init__(self, model: LlamaModel, batch: int, max_ctx: int, device: torch.device) -> None:
        self.model, self.batch, self.device = model, batch, device
        self.width = -(-max_ctx // BLOCK_SIZE)
        self.kv = KVCache.allocate(model.config, batch * self.width, BLOCK_SIZE, model.cache_dtype, device)
        rng = np.random.default_rng(0)
        self.tables = rng.permutation(batch * self.width).reshape(batch, self.width).astype(np.int32)
        self.staging = StepStaging(device)
        self.paged_kernel = paged_kernel_for(device, self.kv.dtype)
        warm_cpu_kernels(model, self.kv.dtype, self.paged_kernel, device, BLOCK_SIZE)
        self.host = _Host(model, self.kv, torch.zeros(max(batch, 1), dtype=torch.long, device=device), device)
        self.graphs: DecodeGraphs | None = None

    def slot_arrays(self, ctx: int) -> dict[str, np.ndarray]:
        """A ring slot's arrays for a decode step of every sequence at context `ctx`."""
        b = self.batch
        a: dict[str, np.ndarray] = {
            "input_ids": -1 - np.arange(b, dtype=np.int64),  # each row's previous token
            "positions": np.full(b, ctx - 1, np.int64),
            "seq_slots": np.arange(b, dtype=np.int32),
            "query_lens": np.ones(b, np.int32),
            "context_lens": np.full(b, ctx, np.int32),
            "cu_seqlens": np.arange(b + 1, dtype=np.int32),
            "block_tables": self.tables,
            "sample_mask": np.ones(b, np.uint8),
            "prompt_lens": np.ones(b, np.int32),
            "sample_step": np.full(b, ctx - 1, np.int64),
            "embed": np.zeros(b, np.uint8),
        }
        for name, value, dt in (
            ("temperature", 0.0, np.float32),
            ("top_k", 0, np.int32),
            ("top_p", 1.0, np.float32),
            ("min_p", 0.0, np.float32),
            ("repetition_penalty", 1.0, np.float32),
            ("presence_penalty", 0.0, np.float32),
            ("frequency_penalty", 0.0, np.float32),
            ("seed", 0, np.int64),
            ("num_logprobs", -1, np.int32),
        ):
            a[name] = np.full(b, value, dt)
        return a

    def bell(self) -> Doorbell:
        return Doorbell(0, 0, self.batch, self.batch, -1, False, True, False)

    @torch.inference_mode()
    def eager_step(self, ctx: int) -> torch.Tensor:
        """The worker's eager launch of a greedy decode step: plan, one upload, forward, argmax."""
        plan = plan_step(self.slot_arrays(ctx), self.bell(), BLOCK_SIZE, paged_kernel=self.paged_kernel)
        dev = self.staging.upload(plan.arrays)
        ids = resolve_refs(dev["input_ids"], self.host.prev_sampled)
        logits = self.model(ids, dev["positions"], self.kv, plan.attention.bind(dev), dev["logits_rows"])
        tokens = logits.argmax(dim=-1)
        self.host.prev_sampled.index_copy_(0, dev["sample_rows"], tokens)
        return tokens

    def capture(self) -> None:
        self.graphs = DecodeGraphs(self.host, [self.batch], self.width, paged_kernel=True, capture=True)
        self.graphs._capture_all()

    @torch.inference_mode()
    def graph_step(self, ctx: int) -> torch.Tensor:
        assert self.graphs is not None
        out = self.graphs.try_launch(self.slot_arrays(ctx), self.bell())
        assert out is not None
        return out[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Any, ctx: int, steps: int, device: torch.device) -> float:
    """ms per step over `steps` back-to-back launches (the device kept busy, as the worker does)."""
    step(ctx)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(ctx)
    _sync(device)
    return (time.perf_counter() - t0) * 1000 / steps


def ops_per_layer(model: LlamaModel, batch: int, ctx: int, device: torch.device) -> dict[str, float]:
    b = DecodeBatch(model, batch, ctx, device)
    b.eager_step(ctx)
    with OpCount() as count:
        b.eager_step(ctx)
    n = model.config.num_layers
    return {
        "batch": batch,
        "context": ctx,
        "kernels_per_layer": count.kernels / n,
        "allocations_per_layer": count.allocations / n,
        "views_per_layer": count.views / n,
        "kernels_per_step": count.kernels,
    }


def context_scaling(
    model: LlamaModel, batch: int, contexts: tuple[int, int], steps: int, repeats: int, device: torch.device
) -> dict[str, Any]:
    """Decode tok/s at a short and a long context, alternated repeat by repeat."""
    short, long = contexts
    runs = {c: DecodeBatch(model, batch, c, device) for c in contexts}
    ms: dict[int, list[float]] = {c: [] for c in contexts}
    for _ in range(repeats):
        for c in contexts:
            ms[c].append(time_steps(runs[c].eager_step, c, steps, device))
    tok_s = {c: batch / (median(ms[c]) / 1000) for c in contexts}
    return {
        "batch": batch,
        "contexts": list(contexts),
        "ms_per_step": {str(c): median(ms[c]) for c in contexts},
        "tokens_per_s": {str(c): tok_s[c] for c in contexts},
        "ratio": ratio(tok_s[long], tok_s[short]),
        "target": 0.6,
        "runs_ms": {str(c): ms[c] for c in contexts},
    }


def plan_time_ms(model: LlamaModel, batch: int, ctx: int, repeats: int) -> float:
    """Host time of planning one decode step of `batch` sequences (numpy, from the slot)."""
    b = DecodeBatch(model, batch, ctx, torch.device("cpu"))
    a, bell = b.slot_arrays(ctx), b.bell()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan_step(a, bell, BLOCK_SIZE)
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)


def graphs_vs_eager(
    model: LlamaModel, batches: list[int], ctx: int, steps: int, repeats: int, device: torch.device
) -> list[dict[str, Any]]:
    """GPU only: decode tok/s of eager launches and of graph replays, alternated per repeat."""
    rows = []
    for batch in batches:
        b = DecodeBatch(model, batch, ctx, device)
        b.capture()
        ms: dict[str, list[float]] = {"eager": [], "graph": []}
        for _ in range(repeats):
            ms["eager"].append(time_steps(b.eager_step, ctx, steps, device))
            ms["graph"].append(time_steps(b.graph_step, ctx, steps, device))
        for mode, values in ms.items():
            rows.append(
                {
                    "mode": mode,
                    "batch_size": batch,
                    "ms_per_step": median(values),
                    "tokens_per_s": batch / (median(values) / 1000),
                    "runs_ms": values,
                }
            )
        del b
        torch.cuda.empty_cache()
    return rows


def load_model(path: str | Path, device: torch.device, dtype_name: str) -> LlamaModel:
    """The model exactly as the worker builds it for ``--dtype dtype_name`` (packed weights, kernels
    chosen), so the figures are the serving path's."""
    from tandem.gpu_worker.runner import build_model

    model = build_model(str(path), dtype_name, device)
    if not isinstance(model, LlamaModel):
        raise ValueError(f"{path}: an encoder has no decode step")
    return model


def write_plot(results: dict[str, Any], path: Path) -> bool:
    """tok/s against batch size per mode (GPU), or the context-scaling bars; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written to %s", path)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows = results.get("graphs_vs_eager") or []
    for mode in ("eager", "graph"):
        pts = [(r["batch_size"], r["tokens_per_s"]) for r in rows if r["mode"] == mode]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", label=mode)
    axes[0].set(xlabel="batch size", ylabel="decode tok/s", title="eager vs CUDA graphs", xscale="log")
    if rows:
        axes[0].legend()
    else:
        axes[0].text(0.5, 0.5, "no GPU in this run", ha="center", transform=axes[0].transAxes)
    cs = results["context_scaling"]
    axes[1].bar([str(c) for c in cs["contexts"]], [cs["tokens_per_s"][str(c)] for c in cs["contexts"]])
    title = f"batch {cs['batch']}: long/short {cs['ratio']:.2f}"
    axes[1].set(xlabel="context", ylabel="decode tok/s", title=title)
    fig.suptitle(f"{results['model']} on {results['device']} ({results['dtype']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
