"""One step on the device: slot -> tensors, resolve future tokens, forward, sample, results.

The only module (with the model it drives) that touches a device. Everything it needs about
the step comes from the ring slot; everything it says goes back as a StepResult.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tandem.config import WorkerConfig
from tandem.formats.loader import load_model_weights
from tandem.gpu_worker.cuda_graphs import DecodeGraphs
from tandem.gpu_worker.grammar_state import GrammarRows, apply_bitmask
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model import cpu_kernels
from tandem.gpu_worker.model.architectures import make_model
from tandem.gpu_worker.model.attention import PagedKernel
from tandem.gpu_worker.model.bert import BertModel
from tandem.gpu_worker.model.layers import RMSNorm
from tandem.gpu_worker.model.llama import LlamaModel
from tandem.gpu_worker.model.quant_linear import Int4Planes, cpu_has_bf16, int4_kernel_available
from tandem.gpu_worker.model.triton_attention import triton_available
from tandem.gpu_worker.sampler import SamplingTensors, sample
from tandem.gpu_worker.staging import StepStaging
from tandem.gpu_worker.step_plan import plan_step, resolve_refs
from tandem.messages import Doorbell, StepResult
from tandem.shm.layout import SAMPLING_COLUMNS
from tandem.shm.slot import SlotView

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype. "auto": bf16 on a GPU (fp16 without bf16), and on a CPU bf16 where it
    has AVX-512 BF16 or AMX, else fp32 (emulated bf16 elementwise ops cost more than they save)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (one of auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def packs_weights(name: str, device: torch.device) -> bool:
    """Whether quantized GGUF matrices stay packed: "auto" on a CPU (see quant_linear)."""
    return name == "auto" and device.type == "cpu" and int4_kernel_available()


def default_threads() -> int:
    """The worker's torch threads on a CPU unless --threads says otherwise: all cores but one.

    Measured with benchmarks/bench_packed.py (whole engine, greedy, 64 tokens) on 2 cores: beside
    one other busy process (load 1.1-1.4) 2 threads beat 1 (batch 1: 45 vs 35 tok/s, batch 8: 160
    vs 118, batch 32: 268 vs 170), but beside two (load ~3) they fell to 1.3-5 tok/s at batch 1
    and 8 where 1 thread kept 32-118: every OpenMP region then waits out the time slice of a
    descheduled thread. One core left to the scheduler and everything else gives up that peak and
    never falls off the cliff; --threads takes it back on a machine known to be idle.
    """
    return max(1, (os.cpu_count() or 2) - 1)


def paged_kernel_for(device: torch.device, cache_dtype: torch.dtype) -> PagedKernel | None:
    """The kernel through which decode attention reads the block table (Triton on CUDA, numba on
    the CPU), or None: gather blocks for batched matmuls (model/attention.py)."""
    if device.type == "cuda":
        return PagedKernel.TRITON if triton_available() else None
    if device.type == "cpu" and cpu_kernels.supports(cache_dtype):
        return PagedKernel.NUMBA
    return None


def warm_cpu_kernels(
    model: nn.Module,
    cache_dtype: torch.dtype,
    paged_kernel: PagedKernel | None,
    device: torch.device,
    block_size: int,
) -> None:
    """Before the first step, the CPU kernels this model will call (norms, decode attention, the
    exact int4 matmul), at the thread count set for it; an encoder calls none of them."""
    attention = paged_kernel is PagedKernel.NUMBA
    norms = any(isinstance(m, RMSNorm) for m in model.modules())
    int4 = any(isinstance(m, Int4Planes) and m.exact_pairs is not None for m in model.modules())
    if device.type == "cpu" and (norms or attention or int4) and cpu_kernels.available():
        config = getattr(model, "config", None)
        shape = None
        if attention and config is not None:
            shape = (config.num_heads, config.num_kv_heads, config.head_dim, block_size)
        cpu_kernels.warm_up(
            cache_dtype if attention else None, torch.get_num_threads(), int4=int4, attention=shape
        )


def build_model(model_path: str, dtype_name: str, device: torch.device) -> LlamaModel | BertModel:
    """The model as the worker runs it for ``--dtype dtype_name``, kernels chosen (packed weights
    time their alternatives here, so set the thread count first)."""
    dtype = resolve_dtype(dtype_name, device)
    loaded = load_model_weights(model_path, dtype=dtype, packed=packs_weights(dtype_name, device))
    if loaded.config.is_encoder:
        return BertModel(loaded.config, loaded.tensors, dtype).to(device)  # type: ignore[arg-type]
    model = make_model(loaded.config, loaded.tensors, dtype).to(device)
    del loaded
    if model.has_packed_weights:  # a float file (or a safetensors folder) has nothing to pack
        model.choose_kernels()
    return model


_PROMPT_LP_ROWS = 256  # echo rows whose log-softmax is live at once


@dataclass
class PendingResult:
    """A launched step whose outputs may still be on their way to the host."""

    step: int
    slot: int
    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    logits: torch.Tensor | None
    event: torch.cuda.Event | None
    forward_ms: float
    idle_ms: float
    embeddings: torch.Tensor | None = None  # (pooled, hidden) float32
    grammar_ms: float = 0.0
    grammar_rows: int = 0
    prompt_lps: torch.Tensor | None = None  # (echo positions,) float32: the next prompt token's
    prompt_top_ids: torch.Tensor | None = None  # (echo positions, top-n)
    prompt_top_lps: torch.Tensor | None = None


class ModelRunner:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        eng = cfg.engine
        self.device = torch.device(eng.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {eng.device!r} requested but CUDA is not available (use --device cpu)"
            )
        if eng.threads:
            torch.set_num_threads(eng.threads)
        elif self.device.type == "cpu":
            torch.set_num_threads(default_threads())
        self.dtype = resolve_dtype(eng.dtype, self.device)
        start = time.perf_counter()
        self.model = build_model(eng.model_path, eng.dtype, self.device)
        self.config = self.model.config
        self.load_seconds = time.perf_counter() - start
        self.weights_bytes = self.model.weights_bytes
        self.encoder = self.config.is_encoder
        self.pooling, self.normalize = self.config.embedding_pooling
        # Generative modules embed through their hidden_states (every model class has them), unless
        # the file declares a pooling without one vector an input (ModelConfig.embeds).
        self.embeds = self.config.embeds and (self.encoder or hasattr(self.model, "hidden_states"))
        if self.encoder:  # attention within each whole input: no cache; one nominal block for the plan
            self.kv = KVCache.allocate(self.config, 1, eng.block_size, self.dtype, self.device)
        else:
            self.kv = KVCache.from_memory_budget(
                self.config, eng.kv_cache_memory, eng.block_size, self.model.cache_dtype, self.device
            )
        n = eng.max_num_seqs
        self.prev_sampled = torch.zeros(n, dtype=torch.long, device=self.device)
        # Penalty state per worker slot, allocated the first time a request asks for penalties.
        self.prompt_mask: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        self.pinned = self.device.type == "cuda"
        self.grammar = GrammarRows(eng.model_path, self.config.vocab_size)
        # The previous step's sampled ids on the host, for constrained rows whose input refers to
        # them; copied (without blocking) after every step with a constrained row, with an event.
        self._prev_host = torch.zeros(n, dtype=torch.long, pin_memory=self.pinned)
        self._prev_event: torch.cuda.Event | None = None
        log.info(
            "model ready on %s (%s) in %.2f s: %d KV blocks of %d tokens",
            self.device,
            self.dtype,
            self.load_seconds,
            self.kv.num_blocks,
            eng.block_size,
        )

    def memory_plan(self, max_num_batched_tokens: int) -> dict[str, int | float | str]:
        c = self.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        # Peak live activations of one step: the widest layer intermediates plus the logits rows.
        activations = max_num_batched_tokens * (3 * c.hidden_size + 2 * c.intermediate_size) * elem
        activations += self.cfg.engine.max_num_seqs * c.vocab_size * 4
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch.") + ("+packed" * self.model.has_packed_weights),
            "weights_bytes": self.weights_bytes,  # dense copies included: what the worker holds
            "dense_copy_bytes": self.model.dense_copy_bytes,
            "kv_cache_bytes": self.kv.num_bytes,
            "kv_blocks": self.kv.num_blocks,
            "block_size": self.kv.block_size,
            "kv_tokens": self.kv.num_token_slots,
            "activations_bytes": activations,
            "graphs_bytes": 0,
            "load_seconds": round(self.load_seconds, 3),
        }

    # Set up after __init__ by prepare_launch(); a runner used without it plans eagerly.
    _staging: StepStaging | None = None
    _graphs: DecodeGraphs | None = None
    _paged_kernel: PagedKernel | None = None

    def prepare_launch(self, enforce_eager: bool = False) -> None:
        """Staging buffers, the decode kernel choice and, on a GPU, the captured decode graphs."""
        self._staging = StepStaging(self.device)
        self._paged_kernel = None if self.encoder else paged_kernel_for(self.device, self.kv.dtype)
        warm_cpu_kernels(self.model, self.kv.dtype, self._paged_kernel, self.device, self.kv.block_size)
        if self.device.type == "cuda" and self._paged_kernel is None:
            log.warning("triton is not installed: GPU decode attention runs the portable matmul path")
        if self.device.type == "cuda" and self.config.sliding_window is not None:
            # Sliding layers read through the chunk path, whose shapes change step to step.
            log.info("model has sliding-window layers: decode runs eagerly (no CUDA graphs)")
        elif self.device.type == "cuda" and not enforce_eager and self._paged_kernel is PagedKernel.TRITON:
            self._graphs = DecodeGraphs.capture(self, self.cfg.engine.max_num_seqs, self.cfg.context_length)

    @property
    def staging(self) -> StepStaging:
        if self._staging is None:
            self._staging = StepStaging(self.device)
        return self._staging

    def _update_penalty_state(self, dev: dict[str, torch.Tensor], input_ids: torch.Tensor) -> None:
        """Fold this step's inputs of penalized sequences into their per-slot state (no host reads)."""
        if self.prompt_mask is None:
            shape = (self.cfg.engine.max_num_seqs, self.config.vocab_size)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        assert self.output_counts is not None
        vocab = self.config.vocab_size
        self.prompt_mask.index_fill_(0, dev["pen_reset"], False)
        self.output_counts.index_fill_(0, dev["pen_reset"], 0)
        flat = dev["pen_prompt_slots"] * vocab + input_ids.index_select(0, dev["pen_prompt_rows"])
        self.prompt_mask.view(-1).index_fill_(0, flat, True)
        flat = dev["pen_output_slots"] * vocab + input_ids.index_select(0, dev["pen_output_rows"])
        self.output_counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))

    def _sampling_tensors(self, dev: dict[str, torch.Tensor]) -> SamplingTensors:
        return SamplingTensors(**{name: dev[f"p_{name}"] for name in SAMPLING_COLUMNS}, step=dev["p_step"])

    @torch.inference_mode()
    def launch(self, slot: SlotView, bell: Doorbell, idle_ms: float) -> PendingResult:
        """Enqueue the step. Between here and the return nothing reads a device value on the host:
        all indices come from the slot through numpy and reach the device in one staged copy."""
        t0 = time.perf_counter()
        a = slot.prefixes(bell.num_tokens, bell.num_seqs)
        if self._graphs is not None and not bell.any_grammar and not bell.any_prompt_logprobs:
            launched = self._graphs.try_launch(a, bell)
            if launched is not None:
                tokens, out_logprobs = launched
                return self._pending(bell, tokens, out_logprobs, None, None, None, t0, idle_ms)
        plan = plan_step(
            a,
            bell,
            self.kv.block_size,
            paged_kernel=self._paged_kernel,
            sliding_window=self.config.sliding_window,
            pooling=self.pooling,
            encoder=self.encoder,
        )
        dev = self.staging.upload(plan.arrays)
        if self.encoder:
            return self._launch_encoder(bell, dev, plan.num_pooled, t0, idle_ms)
        input_ids = resolve_refs(dev["input_ids"], self.prev_sampled)
        assert plan.attention is not None
        meta = plan.attention.bind(dev)
        if plan.update_penalties:
            self._update_penalty_state(dev, input_ids)

        embeddings = prompt = None
        if plan.num_pooled or plan.prompt_top >= 0:
            hidden = self.model.hidden_states(input_ids, dev["positions"], self.kv, meta)
            logits = self.model.logits(hidden, dev["logits_rows"])
            if plan.num_pooled:
                pooled = self.model.final_hidden(hidden, dev["pool_rows"])
                embeddings = self._pool(pooled, dev, plan.num_pooled)
            if plan.prompt_top >= 0:
                prompt = self._prompt_logprobs(hidden, dev, plan.prompt_top)
        else:
            logits = self.model(input_ids, dev["positions"], self.kv, meta, dev["logits_rows"])
        g_ms, g_rows = 0.0, 0
        if bell.any_grammar:
            # After the forward is enqueued: on a GPU the host works on matchers while it runs.
            g0 = time.perf_counter()
            masks = self.grammar.prepare(a, self._prev_sampled_host)
            if masks is not None:
                rows, bitmask = masks
                staged = self.staging.upload({"g_rows": rows, "g_mask": bitmask})
                logits = apply_bitmask(logits, staged["g_rows"], staged["g_mask"])
                g_rows = len(rows)
            g_ms = (time.perf_counter() - g0) * 1000
        out_logprobs = top_ids = top_lps = None
        if plan.num_sampled == 0:
            tokens = torch.empty(0, dtype=torch.long, device=self.device)
        elif not plan.sampling:
            tokens = logits.argmax(dim=-1)
        else:
            state = None
            if bell.any_penalties and self.prompt_mask is not None:
                assert self.output_counts is not None
                slots = dev["sample_slots"]
                state = (self.prompt_mask[slots], self.output_counts[slots])
            out = sample(
                logits,
                self._sampling_tensors(dev),
                max_top_logprobs=max(bell.max_top_logprobs, 0),
                penalty_state=state,
            )
            tokens = out.token_ids
            out_logprobs, top_ids, top_lps = out.logprobs, out.top_ids, out.top_logprobs
        if plan.num_sampled:
            self.prev_sampled.index_copy_(0, dev["sample_rows"], tokens)
            if bell.any_grammar:
                self._prev_host.copy_(self.prev_sampled, non_blocking=self.pinned)
                if self.device.type == "cuda":
                    self._prev_event = torch.cuda.Event()
                    self._prev_event.record()
        keep_logits = logits if bell.want_logits else None
        pending = self._pending(bell, tokens, out_logprobs, top_ids, top_lps, keep_logits, t0, idle_ms)
        pending.embeddings = embeddings
        pending.grammar_ms, pending.grammar_rows = g_ms, g_rows
        if prompt is not None:
            pending.prompt_lps, pending.prompt_top_ids, pending.prompt_top_lps = prompt
        return pending

    def _prompt_logprobs(
        self, hidden: torch.Tensor, dev: dict[str, torch.Tensor], top: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """At each echo prompt position: the log-softmax (fp32, before any sampling knob) of the
        next prompt token, and the top ``top`` of the row."""
        rows, targets = dev["plp_rows"], dev["plp_targets"]
        parts: list[tuple[torch.Tensor, ...]] = []
        # A few hundred rows at a time: a whole chunk's fp32 vocabulary rows could take GiBs.
        for i in range(0, rows.shape[0], _PROMPT_LP_ROWS):
            lsm = torch.log_softmax(self.model.logits(hidden, rows[i : i + _PROMPT_LP_ROWS]), dim=-1)
            lps = lsm.gather(1, targets[i : i + _PROMPT_LP_ROWS, None]).squeeze(1)
            parts.append((lps, *lsm.topk(min(top, lsm.shape[1]), dim=-1)) if top else (lps,))
        lps = torch.cat([p[0] for p in parts])
        if top == 0:
            return lps, None, None
        return lps, torch.cat([p[2] for p in parts]), torch.cat([p[1] for p in parts])

    def _prev_sampled_host(self, refs: np.ndarray) -> np.ndarray:
        """Host values of the previous step's sampled ids at rows ``refs``."""
        if self._prev_event is not None:
            self._prev_event.synchronize()
        return self._prev_host.numpy()[refs]

    def _launch_encoder(
        self, bell: Doorbell, dev: dict[str, torch.Tensor], num_pooled: int, t0: float, idle_ms: float
    ) -> PendingResult:
        """An encoder step: every sequence is a whole input to embed (the scheduler sends no other)."""
        hidden = self.model(dev["input_ids"], dev["positions"], dev["bert_pad_rows"], dev["bert_key_mask"])
        embeddings = self._pool(hidden.index_select(0, dev["pool_rows"]), dev, num_pooled)
        tokens = torch.empty(0, dtype=torch.long, device=self.device)
        pending = self._pending(bell, tokens, None, None, None, None, t0, idle_ms)
        pending.embeddings = embeddings
        return pending

    def _pool(self, rows: torch.Tensor, dev: dict[str, torch.Tensor], n: int) -> torch.Tensor:
        """One float32 vector per embedding sequence: its rows weighted and summed (step_plan's
        pool_arrays says which, with what weight), then L2-normalized where the model says so."""
        weighted = rows.float() * dev["pool_weights"][:, None]
        out = weighted.new_zeros(n, rows.shape[1]).index_add_(0, dev["pool_segs"], weighted)
        return F.normalize(out, dim=-1) if self.normalize else out

    def _pending(
        self,
        bell: Doorbell,
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None,
        top_ids: torch.Tensor | None,
        top_lps: torch.Tensor | None,
        logits: torch.Tensor | None,
        t0: float,
        idle_ms: float,
    ) -> PendingResult:
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return PendingResult(
            bell.step,
            bell.slot,
            tokens,
            logprobs,
            top_ids,
            top_lps,
            logits,
            event,
            (time.perf_counter() - t0) * 1000,
            idle_ms,
        )

    @staticmethod
    def finalize(p: PendingResult) -> StepResult:
        """Wait for a launched step and turn its outputs into a message."""
        if p.event is not None:
            p.event.synchronize()
        n = int(p.token_ids.shape[0])
        top_k = 0 if p.top_ids is None else int(p.top_ids.shape[1])

        def raw(t: torch.Tensor | None, dtype: torch.dtype) -> bytes:
            return b"" if t is None else t.detach().to("cpu", dtype).contiguous().numpy().tobytes()

        return StepResult(
            step=p.step,
            slot=p.slot,
            num_sampled=n,
            token_ids=raw(p.token_ids, torch.int64),
            logprobs=raw(p.logprobs, torch.float32),
            top_k=top_k,
            top_ids=raw(p.top_ids, torch.int64),
            top_logprobs=raw(p.top_logprobs, torch.float32),
            logits=raw(p.logits, torch.float32),
            vocab_size=0 if p.logits is None else int(p.logits.shape[1]),
            forward_ms=p.forward_ms,
            idle_ms=p.idle_ms,
            embeddings=raw(p.embeddings, torch.float32),
            embed_dim=0 if p.embeddings is None else int(p.embeddings.shape[1]),
            grammar_ms=p.grammar_ms,
            grammar_rows=p.grammar_rows,
            num_prompt_lps=0 if p.prompt_lps is None else int(p.prompt_lps.shape[0]),
            prompt_lps=raw(p.prompt_lps, torch.float32),
            prompt_top_k=0 if p.prompt_top_ids is None else int(p.prompt_top_ids.shape[1]),
            prompt_top_ids=raw(p.prompt_top_ids, torch.int64),
            prompt_top_lps=raw(p.prompt_top_lps, torch.float32),
        )
