"""Pack a scheduled batch into a ring slot: plain numpy writes into shared memory, no copies."""

from __future__ import annotations

import numpy as np

from tandem.messages import Doorbell
from tandem.scheduler.scheduler import ScheduledBatch
from tandem.shm.slot import SlotView


def pack_batch(
    batch: ScheduledBatch, slot: SlotView, slot_index: int, block_tables: dict[int, list[int]]
) -> Doorbell:
    """Write ``batch`` into ``slot``; return the doorbell that hands it to the worker.

    ``block_tables`` maps seq_id to its current block table (the block manager's lists).
    """
    n_seq = len(batch.items)
    n_tok = batch.num_tokens
    ids = slot.input_ids
    pos = slot.positions
    qlens = slot.query_lens
    cu = slot.cu_seqlens
    ctx = slot.context_lens
    bt = slot.block_tables
    cursor = 0
    cu[0] = 0
    max_top = -1  # -1: no sampled row wants logprobs (0 means the sampled token's own logprob)
    any_pen = False
    all_greedy = True
    want_logits = False
    for i, it in enumerate(batch.items):
        seq = it.seq
        p = seq.params
        n = len(it.input_ids)
        ids[cursor : cursor + n] = it.input_ids
        pos[cursor : cursor + n] = np.arange(it.start, it.start + n)
        cursor += n
        qlens[i] = n
        cu[i + 1] = cursor
        ctx[i] = it.start + n
        table = block_tables[seq.seq_id]
        bt[i, : len(table)] = table
        slot.seq_slots[i] = seq.worker_slot
        slot.prompt_lens[i] = seq.prompt_len
        slot.sample_mask[i] = it.sample
        slot.temperature[i] = p.temperature
        slot.top_k[i] = p.top_k
        slot.top_p[i] = p.top_p
        slot.min_p[i] = p.min_p
        slot.repetition_penalty[i] = p.repetition_penalty
        slot.presence_penalty[i] = p.presence_penalty
        slot.frequency_penalty[i] = p.frequency_penalty
        slot.seed[i] = np.int64(np.uint64(seq.seed & 0xFFFF_FFFF_FFFF_FFFF).view(np.int64))
        slot.sample_step[i] = it.start + n - seq.prompt_len
        nl = -1 if p.logprobs is None else p.logprobs
        slot.num_logprobs[i] = nl
        slot.want_logits[i] = p.return_logits
        if it.sample:
            max_top = max(max_top, nl)
            any_pen |= p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            all_greedy &= p.temperature == 0.0
            want_logits |= p.return_logits
    assert cursor == n_tok, (cursor, n_tok)
    slot.set_header(batch.step, n_tok, n_seq)
    return Doorbell(
        step=batch.step,
        slot=slot_index,
        num_tokens=n_tok,
        num_seqs=n_seq,
        max_top_logprobs=max_top,
        any_penalties=any_pen,
        all_greedy=all_greedy and max_top < 0,
        want_logits=want_logits,
    )
