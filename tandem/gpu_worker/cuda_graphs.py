"""Decode steps replayed as CUDA graphs, one per bucketed batch size and sampling variant.

A pure decode step (one token per sequence, every row sampling, no penalties, no top-n logprobs,
no raw logits) of `n` sequences runs as the graph of the smallest bucket >= n. The graph holds
the whole step: resolving references to tokens of the previous step, the forward with the paged
Triton kernel, greedy argmax or the full sampler, and the write of the sampled tokens where the
next step's references will look. Its inputs live in one static device buffer; the host packs
them into a pinned twin and the launch is one non-blocking copy plus one replay.

Rows past `n` are padding: token 0 at position 0 whose key and value go to the pool's scratch
slot and whose attention reads only that slot, so padding never touches a block the scheduler
owns. Their sampled tokens land in rows of `prev_sampled` that no later step refers to.

On the CPU no graph is captured: the same step body runs eagerly (`DecodeGraphs(..., capture
=False)`), which is how the tests check the static layout, the padding and the references
without a GPU. `--enforce-eager` turns graphs off.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np
import torch

from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata, DecodeChunk, PagedDecode, PagedKernel
from tandem.gpu_worker.model.llama import LlamaModel
from tandem.gpu_worker.sampler import SamplingTensors, sample
from tandem.gpu_worker.staging import fill, pack_offsets, views
from tandem.gpu_worker.step_plan import resolve_refs
from tandem.messages import Doorbell
from tandem.shm.layout import SAMPLING_COLUMNS

log = logging.getLogger(__name__)


class GraphHost(Protocol):
    """What a step body needs from its owner (the ModelRunner, or a benchmark's stand-in)."""

    model: LlamaModel
    kv: KVCache
    prev_sampled: torch.Tensor  # (max_num_seqs,) the previous step's sampled token per row
    device: torch.device


_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)
_DEPTH = 3  # pinned input buffers in rotation, as in StepStaging

# What a padded row carries (and what the template starts as): a greedy, unpenalized row.
_PAD = {
    "p_temperature": 0.0,
    "p_top_k": 0,
    "p_top_p": 1.0,
    "p_min_p": 0.0,
    "p_repetition_penalty": 1.0,
    "p_presence_penalty": 0.0,
    "p_frequency_penalty": 0.0,
    "p_seed": 0,
    "p_num_logprobs": -1,
    "p_step": 0,
}
_SAMPLING_DTYPES = {
    "temperature": np.float32,
    "top_k": np.int32,
    "top_p": np.float32,
    "min_p": np.float32,
    "repetition_penalty": np.float32,
    "presence_penalty": np.float32,
    "frequency_penalty": np.float32,
    "seed": np.int64,
    "num_logprobs": np.int32,
}


def graph_buckets(max_num_seqs: int) -> list[int]:
    return [b for b in _BUCKETS if b < max_num_seqs] + [max_num_seqs]


class DecodeGraphs:
    def __init__(
        self, runner: GraphHost, buckets: list[int], width: int, paged_kernel: bool, capture: bool
    ) -> None:
        self.runner = runner
        self.buckets = buckets
        self.width = width  # block-table columns a graph reads (the context length's blocks)
        self.paged_kernel = paged_kernel
        self.captured = capture
        self.max_b = buckets[-1]
        if self.max_b > runner.prev_sampled.shape[0]:
            raise ValueError(f"graph bucket {self.max_b} exceeds max_num_seqs {runner.prev_sampled.shape[0]}")
        device = runner.device
        self.template = self._template()
        self.offsets, self.nbytes = pack_offsets(self.template)
        self.static_buf = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        self.static = views(self.static_buf, self.template, self.offsets)
        pin = device.type == "cuda"
        self.pinned = [torch.zeros(self.nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(_DEPTH)]
        for p in self.pinned:
            fill(p.numpy(), self.template, self.offsets)
        # The warm-up runs before capture execute: all-padding inputs keep their writes in scratch.
        self.static_buf.copy_(self.pinned[0])
        self.host = [views(p, self.template, self.offsets) for p in self.pinned]
        self.host_np = [{k: v.numpy() for k, v in h.items()} for h in self.host]
        self.events: list[torch.cuda.Event | None] = [None] * _DEPTH
        self._next = 0
        self.rows = torch.arange(self.max_b, device=device)
        self.key_pos = torch.arange(width * runner.kv.block_size, device=device)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor | None]] = {}

    @classmethod
    def capture(cls, host: GraphHost, max_num_seqs: int, context_length: int) -> DecodeGraphs:
        width = -(-context_length // host.kv.block_size)
        graphs = cls(host, graph_buckets(max_num_seqs), width, paged_kernel=True, capture=True)
        graphs._capture_all()
        return graphs

    def _template(self) -> dict[str, np.ndarray]:
        b = self.max_b
        t: dict[str, np.ndarray] = {
            "input_ids": np.zeros(b, np.int64),
            "positions": np.zeros(b, np.int64),
            "slot_mapping": np.full(b, self.runner.kv.scratch_slot, np.int64),
            "context_lens": np.ones(b, np.int32),
        }
        for name in SAMPLING_COLUMNS:
            t[f"p_{name}"] = np.full(b, _PAD[f"p_{name}"], _SAMPLING_DTYPES[name])
        t["p_step"] = np.zeros(b, np.int64)
        # Last, so a step of bucket B copies only B rows of it.
        t["block_tables"] = np.full((b, self.width), self.runner.kv.scratch_block, np.int32)
        return t

    # ---- the step body: what a graph holds ---------------------------------------------------

    def _metadata(self, b: int) -> AttentionMetadata:
        st = self.static
        bs = self.runner.kv.block_size
        tables, lens = st["block_tables"][:b], st["context_lens"][:b]
        paged = chunks = None
        if self.paged_kernel:
            paged = PagedDecode(None, tables, lens, b, PagedKernel.TRITON)
        else:  # the dense fallback: every row reads `width` blocks, masked past its length
            hidden = (self.key_pos[None, :] >= lens[:, None])[:, None, :]
            chunks = [DecodeChunk(None, tables.reshape(-1), hidden, b, self.width)]
        return AttentionMetadata(st["slot_mapping"][:b], chunks or [], paged, [], b, bs)

    def body(self, b: int, greedy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        r, st = self.runner, self.static
        input_ids = resolve_refs(st["input_ids"][:b], r.prev_sampled)
        logits = r.model(input_ids, st["positions"][:b], r.kv, self._metadata(b), self.rows[:b])
        logprobs = None
        if greedy:
            tokens = logits.argmax(dim=-1)
        else:
            params = SamplingTensors(
                **{name: st[f"p_{name}"][:b] for name in SAMPLING_COLUMNS}, step=st["p_step"][:b]
            )
            out = sample(logits, params, max_top_logprobs=0)
            tokens, logprobs = out.token_ids, out.logprobs
        r.prev_sampled[:b].copy_(tokens)
        return tokens, logprobs

    # ---- capture -----------------------------------------------------------------------------

    def _capture_all(self) -> None:
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode():
            # Largest first: smaller graphs then fit in the memory the large ones already pooled.
            for b in reversed(self.buckets):
                for greedy in (True, False):
                    with torch.cuda.stream(side):
                        for _ in range(2):  # compiles the kernels and settles the allocator
                            self.body(b, greedy)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self.outputs[(b, greedy)] = self.body(b, greedy)
                    self.graphs[(b, greedy)] = graph
        torch.cuda.synchronize()
        log.info(
            "captured %d decode graphs (batch buckets %s) in %.2f s",
            len(self.graphs),
            ",".join(map(str, self.buckets)),
            time.perf_counter() - t0,
        )

    # ---- launch ------------------------------------------------------------------------------

    def eligible(self, a: dict[str, np.ndarray], bell: Doorbell) -> bool:
        n = bell.num_seqs
        if n == 0 or bell.num_tokens != n or n > self.max_b:
            return False
        if bell.any_penalties or bell.want_logits or bell.max_top_logprobs > 0:
            return False
        penalized = (a["repetition_penalty"] != 1.0) | (a["presence_penalty"] != 0.0)
        penalized |= a["frequency_penalty"] != 0.0
        return bool(a["sample_mask"].all()) and not penalized.any()

    def _fill(self, k: int, a: dict[str, np.ndarray], n: int, b: int, greedy: bool) -> int:
        """Pack step `a` (n rows) into pinned buffer `k` as bucket `b`; returns the bytes to copy."""
        h = self.host_np[k]
        kv = self.runner.kv
        bs = kv.block_size
        pos = a["positions"].astype(np.int64)
        tables = a["block_tables"][:n, : self.width]
        h["input_ids"][:n] = a["input_ids"]
        h["input_ids"][n:b] = 0
        h["positions"][:n] = pos
        h["positions"][n:b] = 0
        h["slot_mapping"][:n] = tables[np.arange(n), pos // bs].astype(np.int64) * bs + pos % bs
        h["slot_mapping"][n:b] = kv.scratch_slot
        h["context_lens"][:n] = a["context_lens"]
        h["context_lens"][n:b] = 1
        if not greedy:
            for name in SAMPLING_COLUMNS:
                h[f"p_{name}"][:n] = a[name]
                h[f"p_{name}"][n:b] = _PAD[f"p_{name}"]
            h["p_step"][:n] = a["sample_step"]
            h["p_step"][n:b] = 0
        h["block_tables"][:n, : tables.shape[1]] = tables
        h["block_tables"][:n, tables.shape[1] :] = kv.scratch_block
        h["block_tables"][n:b] = kv.scratch_block
        return self.offsets["block_tables"] + b * self.width * 4

    def try_launch(
        self, a: dict[str, np.ndarray], bell: Doorbell
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Enqueue the step as a graph replay; None when it is not a step graphs can run."""
        if not self.eligible(a, bell):
            return None
        n = bell.num_seqs
        b = next(x for x in self.buckets if x >= n)
        greedy = bell.all_greedy
        k = self._next
        self._next = (k + 1) % _DEPTH
        event = self.events[k]
        if event is not None and not event.query():
            event.synchronize()  # only when more steps are in flight than the loop allows
        nbytes = self._fill(k, a, n, b, greedy)
        self.static_buf[:nbytes].copy_(self.pinned[k][:nbytes], non_blocking=True)
        if self.captured:
            if self.events[k] is None:
                self.events[k] = torch.cuda.Event()
            self.events[k].record()  # type: ignore[union-attr]
            self.graphs[(b, greedy)].replay()
            tokens, logprobs = self.outputs[(b, greedy)]
        else:
            tokens, logprobs = self.body(b, greedy)
        # The outputs are the graph's own buffers, which the next replay overwrites: copy them out
        # on the stream (no wait), so this step's result survives until it is posted.
        return tokens[:n].clone(), None if logprobs is None else logprobs[:n].clone()
