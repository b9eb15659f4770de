"""Drive a real ModelRunner through real ring slots, the way the scheduler does, minus the scheduler.

Each `Seq` owns blocks of the pool and a worker slot; `write_step` packs the chosen sequences'
next tokens into a slot exactly as `scheduler/batch.py` lays them out, and returns the doorbell.
A token id below zero is a reference to the token sampled at the previous step in that row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tandem.config import EngineConfig, WorkerConfig
from tandem.gpu_worker.runner import ModelRunner, PendingResult
from tandem.messages import Doorbell
from tandem.shm import RingSegment
from tandem.shm.layout import batch_layout
from tandem.shm.slot import SlotView

BLOCK = 16


@dataclass
class Seq:
    worker_slot: int
    blocks: list[int]
    prompt_len: int
    done: int = 0  # tokens already fed
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int = 0
    num_logprobs: int = -1
    extra: dict = field(default_factory=dict)


def make_runner(
    model_path: Path, device: str = "cpu", max_num_seqs: int = 8, context: int = 256, dtype: str = "float32"
) -> tuple[ModelRunner, RingSegment]:
    layout = batch_layout(128, max_num_seqs, -(-context // BLOCK), 2)
    ring = RingSegment.create(layout, prefix="tandemtest")
    engine = EngineConfig(
        model_path=str(model_path),
        device=device,
        dtype=dtype,
        kv_cache_memory=8 << 20,
        block_size=BLOCK,
        max_num_seqs=max_num_seqs,
        threads=torch.get_num_threads(),  # leave the test process's thread count as it is
    )
    cfg = WorkerConfig(engine, context, ring.handle(), doorbell_endpoint="", results_endpoint="")
    return ModelRunner(cfg), ring


def write_step(slot: SlotView, step: int, work: list[tuple[Seq, list[int]]]) -> Doorbell:
    """Pack `work` (sequence, its new input ids) into `slot`; each sequence samples after its chunk."""
    a = slot.arrays()
    ids: list[int] = []
    pos: list[int] = []
    for i, (s, new) in enumerate(work):
        ids += new
        pos += range(s.done, s.done + len(new))
        a["query_lens"][i] = len(new)
        a["context_lens"][i] = s.done + len(new)
        a["seq_slots"][i] = s.worker_slot
        a["block_tables"][i, : len(s.blocks)] = s.blocks
        a["sample_mask"][i] = s.done + len(new) >= s.prompt_len
        a["prompt_lens"][i] = s.prompt_len
        a["temperature"][i] = s.temperature
        a["top_k"][i] = s.top_k
        a["top_p"][i] = s.top_p
        a["min_p"][i] = 0.0
        a["repetition_penalty"][i] = s.repetition_penalty
        a["presence_penalty"][i] = 0.0
        a["frequency_penalty"][i] = s.frequency_penalty
        a["seed"][i] = s.seed
        a["num_logprobs"][i] = s.num_logprobs
        a["want_logits"][i] = 0
        a["sample_step"][i] = s.done + len(new) - s.prompt_len
        s.done += len(new)
    n = len(work)
    a["input_ids"][: len(ids)] = ids
    a["positions"][: len(ids)] = pos
    a["cu_seqlens"][0] = 0
    np.cumsum(a["query_lens"][:n], out=a["cu_seqlens"][1 : n + 1])
    slot.set_header(step, len(ids), n)
    sampled = [s for s, new in work if s.done >= s.prompt_len]
    max_top = max([s.num_logprobs for s in sampled], default=-1)
    any_pen = any(s.repetition_penalty != 1.0 or s.frequency_penalty != 0.0 for s in sampled)
    greedy = all(s.temperature == 0.0 for s in sampled) and max_top < 0
    return Doorbell(step, slot.index, len(ids), n, max_top, any_pen, greedy, False)


def tokens_of(runner: ModelRunner, pending: PendingResult) -> list[int]:
    res = runner.finalize(pending)
    assert not res.error, res.error
    return np.frombuffer(res.token_ids, dtype=np.int64).tolist()
