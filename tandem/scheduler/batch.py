"""Pack a scheduled batch into a ring slot: plain numpy writes into shared memory, no copies.

Each column is gathered in Python once and written with one slice assignment; per-element
numpy writes cost ~1 us each and made packing 256 sequences take ~5 ms.

A `Packer` also remembers, per ring slot, which sequences its rows held the last time: only the
worker reads a slot, so what was written there is still there. When a slot gets the same
sequences in the same rows again (every decode step between arrivals and finishes), the
per-sequence constant columns (sampling parameters, prompt lengths) and the doorbell's flags are
left as they are, and only the block-table rows that changed are rewritten.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain

import numpy as np

from tandem.messages import Doorbell
from tandem.scheduler.scheduler import ScheduledBatch
from tandem.scheduler.sequence import Sequence
from tandem.shm.layout import SAMPLING_COLUMNS
from tandem.shm.slot import SlotView

_PARAM_COLUMNS = (
    *SAMPLING_COLUMNS,
    "want_logits",
    "prompt_lens",
    "embed",
    "grammar_id",
    "grammar_key",
    "prompt_logprobs",
)
_NO_BLOCKS: list[int] = []  # the table of an encoder's embedding, which holds no KV
# Where _flags reads a row's values (a row holds _PARAM_COLUMNS in order).
_TEMP, _PRES_PEN, _FREQ_PEN, _REP_PEN = (
    _PARAM_COLUMNS.index(c)
    for c in ("temperature", "presence_penalty", "frequency_penalty", "repetition_penalty")
)
_LOGPROBS, _LOGITS, _GRAMMAR, _PROMPT_LPS = (
    _PARAM_COLUMNS.index(c) for c in ("num_logprobs", "want_logits", "grammar_id", "prompt_logprobs")
)
_Flags = tuple[int, bool, bool, bool, bool, bool]


def _param_row(seq: Sequence) -> tuple:
    """The sequence's constant per-row values, computed once per sequence."""
    row = seq.packed_params
    if row is None:
        p = seq.params
        seed = seq.seed & 0xFFFF_FFFF_FFFF_FFFF
        seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # same bits as int64
        row = (
            p.temperature,
            p.top_k,
            p.top_p,
            p.min_p,
            p.repetition_penalty,
            p.presence_penalty,
            p.frequency_penalty,
            seed,
            -1 if p.logprobs is None else p.logprobs,
            p.return_logits,
            seq.prompt_len,
            seq.embed,
            seq.grammar_id,
            # unique per admission: a recompute (new epoch) restarts the worker's matcher
            (seq.seq_id << 16 | (seq.epoch & 0xFFFF)) + 1 if seq.grammar_id else 0,
            -1 if p.prompt_logprobs is None else p.prompt_logprobs,
        )
        seq.packed_params = row
    return row


def _flags(param_rows: list[tuple], sample: list[bool]) -> _Flags:
    """The doorbell's (max_top_logprobs, any_penalties, all_greedy, want_logits, any_grammar,
    any_prompt_logprobs)."""
    max_top = -1  # -1: no sampled row wants logprobs (0 means the sampled token's own logprob)
    any_pen = False
    all_greedy = True
    want_logits = False
    # Any row, sampled or not: a constrained prefill chunk feeds its matcher too.
    any_grammar = False
    any_prompt_lps = False
    for r, s in zip(param_rows, sample, strict=True):
        any_grammar |= r[_GRAMMAR] != 0
        any_prompt_lps |= r[_PROMPT_LPS] >= 0
        if s:
            max_top = max(max_top, r[_LOGPROBS])
            any_pen |= r[_REP_PEN] != 1.0 or r[_PRES_PEN] != 0.0 or r[_FREQ_PEN] != 0.0
            all_greedy &= r[_TEMP] == 0.0
            want_logits |= bool(r[_LOGITS])
    return max_top, any_pen, all_greedy and max_top < 0, want_logits, any_grammar, any_prompt_lps


def _write_targets(items: list, target_ids: np.ndarray) -> None:
    """Per token of an echo row, the prompt token after it (-1 past the prompt's end), so the
    worker can return that token's logprob at each prompt position; other rows get -1."""
    target_ids[:] = -1
    offset = 0
    for it in items:
        q = len(it.input_ids)
        seq = it.seq
        if seq.params.prompt_logprobs is not None and it.start < seq.prompt_len - 1:
            nxt = seq.token_ids[it.start + 1 : min(it.start + q + 1, seq.prompt_len)]
            target_ids[offset : offset + len(nxt)] = nxt
        offset += q


@dataclass
class _SlotMemo:
    """What a slot's rows hold since its last pack."""

    seqs: list[Sequence]  # row -> sequence: its constant columns are written
    tables: list[list[int]]  # row -> the block table list written there
    table_lens: list[int]  # row -> how many of its entries were written
    sample: list[bool]
    flags: _Flags
    epochs: list[int]  # a sequence preempted and readmitted into the same row has new constants


class Packer:
    """`pack_batch` with a memory of each slot's rows (see the module docstring). One per ring."""

    def __init__(self) -> None:
        self._memo: dict[int, _SlotMemo] = {}

    @staticmethod
    def check_params(seq: Sequence, slot: SlotView) -> None:
        """Raise ValueError naming the column when one of the sequence's constant values does not
        fit its ring column: called at admission, so a bad value fails its own request there and
        never a whole step at packing time."""
        arrays = slot.arrays()
        for name, value in zip(_PARAM_COLUMNS, _param_row(seq), strict=True):
            dtype = arrays[name].dtype
            cell = np.empty(1, dtype=dtype)
            try:
                with np.errstate(over="raise", invalid="raise"):
                    cell[0] = value
            except (OverflowError, ValueError, TypeError, FloatingPointError):
                raise ValueError(f"{name}={value!r} does not fit the step's {dtype} column") from None
            if dtype.kind == "f" and not np.isfinite(cell[0]):
                raise ValueError(f"{name}={value!r} does not fit the step's {dtype} column")

    @staticmethod
    def check_prompt(token_ids: list[int], vocab_size: int) -> None:
        """Raise ValueError unless every prompt id is a row of the model's embedding: one that is
        not would fail the worker's whole step, and with it every request in the step."""
        try:
            ids = np.asarray(token_ids, dtype=np.int64)
        except (OverflowError, ValueError, TypeError):
            raise ValueError("prompt token ids do not fit the step's int64 input_ids column") from None
        if ids.ndim != 1 or (ids.size and not (0 <= ids.min() and ids.max() < vocab_size)):
            raise ValueError(
                f"prompt token ids are not all rows of the model's embedding (0..{vocab_size - 1})"
            )

    def forget(self) -> None:
        self._memo.clear()

    def pack(
        self, batch: ScheduledBatch, slot: SlotView, slot_index: int, block_tables: Mapping[int, list[int]]
    ) -> Doorbell:
        """Write ``batch`` into ``slot``; return the doorbell that hands it to the worker.

        ``block_tables`` maps seq_id to its current block table (the block manager's lists).
        """
        memo = self._memo.pop(slot_index, None)  # back only once the slot is fully written
        items = batch.items
        n_seq = len(items)
        n_tok = batch.num_tokens
        arrays = slot.arrays()
        seqs = [it.seq for it in items]
        epochs = [s.epoch for s in seqs]
        # identity: Sequence compares by identity
        same = memo is not None and memo.seqs == seqs and memo.epochs == epochs

        starts = [it.start for it in items]
        cu = arrays["cu_seqlens"]
        if n_tok == n_seq:  # all decodes: one token each
            arrays["input_ids"][:n_tok] = [it.input_ids[0] for it in items]
            positions = arrays["positions"][:n_tok]
            positions[:] = starts
            arrays["query_lens"][:n_seq] = 1
            cu[: n_seq + 1] = np.arange(n_seq + 1, dtype=np.int32)
            arrays["context_lens"][:n_seq] = positions + 1
        else:
            qlens = [len(it.input_ids) for it in items]
            arrays["input_ids"][:n_tok] = list(chain.from_iterable(it.input_ids for it in items))
            arrays["positions"][:n_tok] = list(
                chain.from_iterable(range(s, s + q) for s, q in zip(starts, qlens, strict=True))
            )
            q = np.asarray(qlens, dtype=np.int32)
            arrays["query_lens"][:n_seq] = q
            cu[0] = 0
            np.cumsum(q, out=cu[1 : n_seq + 1])
            arrays["context_lens"][:n_seq] = np.asarray(starts, dtype=np.int32) + q

        tables = [block_tables.get(s.seq_id, _NO_BLOCKS) for s in seqs]
        table_lens = list(map(len, tables))
        bt = arrays["block_tables"]
        if same:
            assert memo is not None
            if table_lens != memo.table_lens or not all(map(operator.is_, tables, memo.tables)):
                for i, (t, n, old_t, old_n) in enumerate(
                    zip(tables, table_lens, memo.tables, memo.table_lens, strict=True)
                ):
                    if t is not old_t:
                        bt[i, :n] = t
                    elif n != old_n:  # block tables only grow while the sequence holds them
                        bt[i, old_n:n] = t[old_n:]
        else:
            lengths = np.asarray(table_lens, dtype=np.int64)
            rows = np.repeat(np.arange(n_seq), lengths)
            cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            bt[rows, cols] = list(chain.from_iterable(tables))

        arrays["seq_slots"][:n_seq] = [s.worker_slot for s in seqs]
        sample = [it.sample for it in items]
        arrays["sample_mask"][:n_seq] = sample

        if same:
            assert memo is not None
            flags = memo.flags if sample == memo.sample else _flags([s.packed_params for s in seqs], sample)
        else:
            param_rows = [_param_row(s) for s in seqs]
            for name, column in zip(_PARAM_COLUMNS, zip(*param_rows, strict=True), strict=True):
                arrays[name][:n_seq] = column
            flags = _flags(param_rows, sample)
        # the index of the token being sampled among the outputs: the RNG step (context - prompt)
        np.subtract(
            arrays["context_lens"][:n_seq], arrays["prompt_lens"][:n_seq], out=arrays["sample_step"][:n_seq]
        )

        slot.set_header(batch.step, n_tok, n_seq)
        self._memo[slot_index] = _SlotMemo(seqs, tables, table_lens, sample, flags, epochs)
        max_top, any_pen, all_greedy, want_logits, any_grammar, any_prompt_lps = flags
        if any_prompt_lps:
            _write_targets(items, arrays["target_ids"][:n_tok])
        return Doorbell(
            step=batch.step,
            slot=slot_index,
            num_tokens=n_tok,
            num_seqs=n_seq,
            max_top_logprobs=max_top,
            any_penalties=any_pen,
            all_greedy=all_greedy,
            want_logits=want_logits,
            any_grammar=any_grammar,
            any_prompt_logprobs=any_prompt_lps,
        )


def pack_batch(
    batch: ScheduledBatch, slot: SlotView, slot_index: int, block_tables: Mapping[int, list[int]]
) -> Doorbell:
    """Write ``batch`` into ``slot`` in full (no memory of earlier packs); return its doorbell.

    ``block_tables`` maps seq_id to its current block table (the block manager's lists).
    """
    return Packer().pack(batch, slot, slot_index, block_tables)
