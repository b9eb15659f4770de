"""Everything a step needs from the host, computed in numpy from the ring slot before launch.

The slot's arrays are read here and only here: indices for attention, which rows sample and
which logits rows they read, sampling parameters, and penalty bookkeeping. The result is a dict
of numpy arrays that `StepStaging` uploads in one copy, so the launch itself only enqueues
device work and never reads a device value back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tandem.gpu_worker.model.attention import DEFAULT_MAX_CHUNK_KEYS, AttentionPlan, PagedKernel
from tandem.gpu_worker.model.bert import bert_batch_arrays
from tandem.messages import Doorbell
from tandem.shm.layout import SAMPLING_COLUMNS


@dataclass
class StepPlan:
    arrays: dict[str, np.ndarray]
    attention: AttentionPlan | None  # None for an encoder step
    num_sampled: int
    sampling: bool  # sampling parameters are staged (not the all-greedy fast path)
    update_penalties: bool  # some sequence is penalized: its inputs go into the penalty state
    num_pooled: int = 0  # embedding sequences: their hidden states are pooled (`pool_arrays`)
    # Echo rows' prompt positions (``plp_rows``, ``plp_targets``): the top-n they return; -1: none.
    prompt_top: int = -1


def pool_arrays(a: dict[str, np.ndarray], rows: np.ndarray, pooling: str) -> dict[str, np.ndarray]:
    """Which token rows of the embedding sequences ``rows`` make their vectors, with what weight:
    ``pool_rows`` (token rows), ``pool_segs`` (the vector each adds to) and ``pool_weights``. Each
    sequence is whole in the step, so mean pooling averages its query tokens."""
    cu = a["cu_seqlens"].astype(np.int64)
    starts, ends = cu[rows], cu[rows + 1]
    if pooling == "mean":
        lens = ends - starts
        within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        tokens = np.repeat(starts, lens) + within
        segs = np.repeat(np.arange(len(rows)), lens)
        weights = np.repeat(1.0 / lens, lens).astype(np.float32)
    else:
        tokens = starts if pooling == "cls" else ends - 1
        segs = np.arange(len(rows))
        weights = np.ones(len(rows), dtype=np.float32)
    return {"pool_rows": tokens, "pool_segs": segs, "pool_weights": weights}


def _penalty_arrays(a: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """Token rows of penalized sequences, split into prompt and output tokens, with their slots.

    Every token reaches the worker as an input exactly once (prompt chunks, then each generated
    token as the next step's input), so counting inputs before sampling sees exactly the history
    up to the token being sampled, recomputation included.
    """
    cu = a["cu_seqlens"].astype(np.int64)
    qlens = cu[rows + 1] - cu[rows]
    within = np.arange(int(qlens.sum())) - np.repeat(np.cumsum(qlens) - qlens, qlens)
    tokens = np.repeat(cu[rows], qlens) + within
    slots = np.repeat(a["seq_slots"][rows].astype(np.int64), qlens)
    is_prompt = a["positions"][tokens] < np.repeat(a["prompt_lens"][rows], qlens)
    fresh = (a["context_lens"][rows].astype(np.int64) - qlens) == 0  # starts at position 0: a new occupant
    return {
        "pen_reset": a["seq_slots"][rows[fresh]].astype(np.int64),
        "pen_prompt_rows": tokens[is_prompt],
        "pen_prompt_slots": slots[is_prompt],
        "pen_output_rows": tokens[~is_prompt],
        "pen_output_slots": slots[~is_prompt],
    }


def plan_step(
    a: dict[str, np.ndarray],
    bell: Doorbell,
    block_size: int,
    paged_kernel: PagedKernel | None = None,
    max_chunk_keys: int = DEFAULT_MAX_CHUNK_KEYS,
    sliding_window: int | None = None,
    pooling: str = "last",
    encoder: bool = False,
) -> StepPlan:
    """`a`: the slot's arrays cut to this step (`SlotView.prefixes`). Reads them, never keeps them.
    ``encoder``: a BERT step (every sequence an embedding, attention within each, no KV cache)."""
    arrays: dict[str, np.ndarray] = {"input_ids": a["input_ids"], "positions": a["positions"]}
    pooled = np.flatnonzero(a["embed"])
    if len(pooled):
        arrays.update(pool_arrays(a, pooled, pooling))
    if encoder:
        arrays.update(bert_batch_arrays(a["query_lens"]))
        return StepPlan(arrays, None, 0, False, False, len(pooled))
    attention = AttentionPlan.make(
        arrays,
        a["positions"],
        a["query_lens"],
        a["context_lens"],
        a["block_tables"],
        block_size,
        paged_kernel=paged_kernel,
        max_chunk_keys=max_chunk_keys,
        sliding_window=sliding_window,
    )
    sample_rows = np.flatnonzero(a["sample_mask"])
    arrays["sample_rows"] = sample_rows
    arrays["logits_rows"] = a["cu_seqlens"][sample_rows + 1].astype(np.int64) - 1
    sampling = bool(len(sample_rows)) and not (bell.all_greedy and not bell.any_penalties)
    if sampling:
        for name in SAMPLING_COLUMNS:
            arrays[f"p_{name}"] = a[name][sample_rows]
        arrays["p_step"] = a["sample_step"][sample_rows]
    penalized = np.flatnonzero(
        (a["repetition_penalty"] != 1.0) | (a["presence_penalty"] != 0.0) | (a["frequency_penalty"] != 0.0)
    )
    if len(penalized):
        arrays.update(_penalty_arrays(a, penalized))
    if sampling and bell.any_penalties:
        arrays["sample_slots"] = a["seq_slots"][sample_rows].astype(np.int64)
    prompt_top = -1
    if bell.any_prompt_logprobs:  # the scheduler wrote target_ids only then
        rows = np.flatnonzero(a["target_ids"] >= 0)
        if len(rows):
            arrays["plp_rows"] = rows
            arrays["plp_targets"] = a["target_ids"][rows]
            prompt_top = int(a["prompt_logprobs"].max())
    return StepPlan(
        arrays, attention, len(sample_rows), sampling, bool(len(penalized)), len(pooled), prompt_top
    )


def resolve_refs(input_ids: torch.Tensor, prev_sampled: torch.Tensor) -> torch.Tensor:
    """Replace "token sampled at the previous step, row r" references (-r - 1) on the device."""
    refs = (-input_ids - 1).clamp(min=0, max=prev_sampled.shape[0] - 1)
    return torch.where(input_ids < 0, prev_sampled[refs], input_ids)
