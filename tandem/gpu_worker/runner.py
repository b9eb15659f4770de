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

from tandem.config import WorkerConfig
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata
from tandem.gpu_worker.model.llama import LlamaModel
from tandem.gpu_worker.model.quant_linear import cpu_has_bf16, int4_kernel_available
from tandem.gpu_worker.sampler import SamplingTensors, sample
from tandem.messages import Doorbell, StepResult
from tandem.models.loader import load_model_weights
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


def build_model(model_path: str, dtype_name: str, device: torch.device) -> LlamaModel:
    """The model as the worker runs it for ``--dtype dtype_name``, kernels chosen (packed weights
    time their alternatives here, so set the thread count first)."""
    dtype = resolve_dtype(dtype_name, device)
    loaded = load_model_weights(model_path, dtype=dtype, packed=packs_weights(dtype_name, device))
    model = LlamaModel(loaded.config, loaded.tensors, dtype).to(device)
    del loaded
    if model.has_packed_weights:  # a float file (or a safetensors folder) has nothing to pack
        model.choose_kernels()
    return model


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


class ModelRunner:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {cfg.device!r} requested but CUDA is not available (use --device cpu)"
            )
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif self.device.type == "cpu":
            torch.set_num_threads(default_threads())
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        start = time.perf_counter()
        self.model = build_model(cfg.model_path, cfg.dtype, self.device)
        self.config = self.model.config
        self.load_seconds = time.perf_counter() - start
        self.weights_bytes = self.model.weights_bytes
        self.kv = KVCache.from_memory_budget(
            self.config, cfg.kv_cache_memory, cfg.block_size, self.dtype, self.device
        )
        n = cfg.max_num_seqs
        self.prev_sampled = torch.zeros(n, dtype=torch.long, device=self.device)
        # Penalty state per worker slot, allocated the first time a request asks for penalties.
        self.prompt_mask: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        self.pinned = self.device.type == "cuda"
        log.info(
            "model ready on %s (%s) in %.2f s: %d KV blocks of %d tokens",
            self.device,
            self.dtype,
            self.load_seconds,
            self.kv.num_blocks,
            cfg.block_size,
        )

    def memory_plan(self, max_num_batched_tokens: int) -> dict[str, int | float | str]:
        c = self.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        # Peak live activations of one step: the widest layer intermediates plus the logits rows.
        activations = max_num_batched_tokens * (3 * c.hidden_size + 2 * c.intermediate_size) * elem
        activations += self.cfg.max_num_seqs * c.vocab_size * 4
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch.") + ("+packed" * self.model.has_packed_weights),
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv.num_bytes,
            "kv_blocks": self.kv.num_blocks,
            "block_size": self.kv.block_size,
            "kv_tokens": self.kv.num_token_slots,
            "activations_bytes": activations,
            "graphs_bytes": 0,
            "load_seconds": round(self.load_seconds, 3),
        }

    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        # The slot is handed back right after this copy, so the tensor must own its memory.
        t = torch.from_numpy(arr.copy())
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _update_penalty_state(
        self, rows: np.ndarray, a: dict[str, np.ndarray], input_ids: torch.Tensor, positions: torch.Tensor
    ) -> None:
        """Fold this step's inputs of penalized sequences into their per-slot state.

        Every token reaches the worker as an input exactly once (prompt chunks, then each
        generated token as the next step's input), so counting inputs before sampling sees
        exactly the history up to the token being sampled, recomputation included.
        """
        if self.prompt_mask is None:
            shape = (self.cfg.max_num_seqs, self.config.vocab_size)
            self.prompt_mask = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.output_counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        assert self.output_counts is not None
        cu = a["cu_seqlens"]
        for i in rows:
            slot = int(a["seq_slots"][i])
            lo, hi = int(cu[i]), int(cu[i + 1])
            if int(a["context_lens"][i]) - (hi - lo) == 0:  # starts from position 0: a new occupant
                self.prompt_mask[slot].zero_()
                self.output_counts[slot].zero_()
            ids = input_ids[lo:hi]
            is_prompt = positions[lo:hi] < int(a["prompt_lens"][i])
            self.prompt_mask[slot, ids[is_prompt]] = True
            self.output_counts[slot].index_add_(
                0, ids[~is_prompt], torch.ones_like(ids[~is_prompt], dtype=torch.int32)
            )

    @torch.inference_mode()
    def launch(self, slot: SlotView, bell: Doorbell, idle_ms: float) -> PendingResult:
        t0 = time.perf_counter()
        a = slot.prefixes(bell.num_tokens, bell.num_seqs)
        input_ids = self._to_device(a["input_ids"])
        positions = self._to_device(a["positions"])
        block_tables = self._to_device(a["block_tables"])
        # Resolve "token sampled at the previous step, row r" references on the device.
        refs = (-input_ids - 1).clamp(min=0, max=self.prev_sampled.shape[0] - 1)
        input_ids = torch.where(input_ids < 0, self.prev_sampled[refs], input_ids)

        qlens = a["query_lens"].tolist()
        meta = AttentionMetadata.build(
            positions, qlens, a["context_lens"].tolist(), block_tables, self.kv.block_size
        )
        sample_rows = np.flatnonzero(a["sample_mask"])
        logits_rows = torch.from_numpy(a["cu_seqlens"][sample_rows + 1].astype(np.int64) - 1).to(self.device)

        penalized = (
            (a["repetition_penalty"] != 1.0)
            | (a["presence_penalty"] != 0.0)
            | (a["frequency_penalty"] != 0.0)
        )
        if penalized.any():
            self._update_penalty_state(np.flatnonzero(penalized), a, input_ids, positions)

        logits = self.model(input_ids, positions, self.kv, meta, logits_rows)
        out_logprobs = top_ids = top_lps = None
        if len(sample_rows) == 0:
            tokens = torch.empty(0, dtype=torch.long, device=self.device)
        elif bell.all_greedy and not bell.any_penalties:
            tokens = logits.argmax(dim=-1)
        else:
            params = SamplingTensors(
                temperature=self._to_device(a["temperature"][sample_rows]),
                top_k=self._to_device(a["top_k"][sample_rows]),
                top_p=self._to_device(a["top_p"][sample_rows]),
                min_p=self._to_device(a["min_p"][sample_rows]),
                repetition_penalty=self._to_device(a["repetition_penalty"][sample_rows]),
                presence_penalty=self._to_device(a["presence_penalty"][sample_rows]),
                frequency_penalty=self._to_device(a["frequency_penalty"][sample_rows]),
                seed=self._to_device(a["seed"][sample_rows]),
                step=self._to_device(a["sample_step"][sample_rows]),
                num_logprobs=self._to_device(a["num_logprobs"][sample_rows]),
            )
            state = None
            if bell.any_penalties and self.prompt_mask is not None:
                slots = torch.from_numpy(a["seq_slots"][sample_rows].astype(np.int64)).to(self.device)
                assert self.output_counts is not None
                state = (self.prompt_mask[slots], self.output_counts[slots])
            out = sample(logits, params, max_top_logprobs=max(bell.max_top_logprobs, 0), penalty_state=state)
            tokens = out.token_ids
            out_logprobs, top_ids, top_lps = out.logprobs, out.top_ids, out.top_logprobs
        if len(sample_rows):
            rows = torch.from_numpy(sample_rows.astype(np.int64)).to(self.device)
            self.prev_sampled[rows] = tokens

        event = None
        keep_logits = logits if bell.want_logits else None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return PendingResult(
            bell.step,
            bell.slot,
            tokens,
            out_logprobs,
            top_ids,
            top_lps,
            keep_logits,
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
        )
