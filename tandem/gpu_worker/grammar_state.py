"""Grammar-constrained rows of a step: one llguidance matcher per worker slot, masks per step.

Why the matcher lives here, in the worker. The mask for a row's step N+1 depends on the token it
sampled at step N, and with the overlap the scheduler packs N+1 before that token exists (the
row's input is a reference the worker resolves). The worker is the one place that sees every
token of a sequence exactly once, in order, as an *input* (prompt chunks, then each sampled
token as the next step's input, recomputation included), just as its penalty state does. So:

- a constrained row's matcher advances on the row's *inputs* at output positions (position >=
  prompt_len), never on what it samples. A token the worker sampled for a step the scheduler
  later drops (the sequence finished, was cancelled or preempted meanwhile) is never an input,
  so it never reaches the matcher;
- preemption by recompute readmits the sequence under a new ``grammar_key`` (seq id and epoch)
  and from position 0 (constrained sequences never take prefix-cache hits on recompute, see
  scheduler.py's ``_cache_key``): the worker sees a new key, starts a fresh matcher and replays
  the generated tokens as the recompute feeds them. Cancel needs nothing: the slot's next
  occupant has another key;
- right before sampling, each constrained sampled row gets its bitmask from its matcher and only
  that row's logits are masked (-inf where the grammar forbids); greedy, temperature, top-k/p,
  min-p and penalties then act on the masked distribution. Rows without a grammar are not
  touched, and the scheduler's overlap (N+1 packed while N runs) holds for every row alike.
  On a GPU the step's forward is enqueued first and the host computes masks while it runs;
  the only wait is for the previous step's sampled ids of constrained rows (a small copy
  recorded after that step's sampling), never for the current forward. A step with a constrained
  row does not replay a CUDA graph (its sampling takes a mask the graph has no input for);
- EOS is in the mask only where the grammar accepts; once the grammar is complete (or the
  matcher failed), only EOS is allowed, so the sequence ends with "stop". max_tokens reached
  inside an unfinished structure ends with "length" as always.

Compilation never runs on the step loop when it can be helped: the scheduler sends each
grammar's text (GrammarSpec) as soon as a request with it arrives, and it is compiled on a
background thread (llguidance drops the GIL), cached by (kind, text). A row whose grammar is
still compiling when its first sampling comes waits for it (llguidance builds lexers lazily, so
compiles take about a millisecond for a 20-property schema; see benchmarks/bench_grammar_libs.py).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class _Row:
    key: int
    matcher: object | None  # llguidance.LLMatcher; None when its grammar failed to compile
    consumed: int = 0  # output tokens fed so far


class GrammarRows:
    def __init__(self, model_path: str, vocab_size: int) -> None:
        self.model_path = model_path
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._cache: Future | None = None  # MatcherCache, built on first use (the tokenizer, ~0.3 s)
        self._compiled: dict[int, Future] = {}
        self._rows: dict[int, _Row] = {}  # worker slot -> its occupant's matcher
        self._eos: list[int] = []
        self.ms_total = 0.0
        self.rows_total = 0

    # -- grammars (GrammarSpec / GrammarRelease) ------------------------------------------------
    def _matcher_cache(self):
        from tandem.grammar.compile import MatcherCache
        from tandem.grammar.tokenizer import ll_tokenizer
        from tandem.tokenizer.model_files import load_tokenizer

        tok = load_tokenizer(self.model_path)
        self._eos = list(tok.eos_ids) or ([tok.eos_id] if tok.eos_id is not None else [])
        return MatcherCache(ll_tokenizer(tok, self.vocab_size))

    def register(self, grammar_id: int, kind: str, text: str) -> None:
        if self._cache is None:
            self._cache = self._pool.submit(self._matcher_cache)
        cache = self._cache
        self._compiled[grammar_id] = self._pool.submit(lambda: cache.result().compile(kind, text))

    def release(self, grammar_id: int) -> None:
        self._compiled.pop(grammar_id, None)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _new_matcher(self, grammar_id: int) -> object | None:
        fut = self._compiled.get(grammar_id)
        if fut is None:
            log.error("grammar %d was never sent to the worker: the row may only end", grammar_id)
            return None
        try:
            return fut.result().deep_copy()
        except Exception:
            log.exception("grammar %d failed to compile in the worker: the row may only end", grammar_id)
            return None

    # -- a step ---------------------------------------------------------------------------------
    def prepare(self, a: dict[str, np.ndarray], resolve: callable) -> tuple[np.ndarray, np.ndarray] | None:
        """Advance every constrained row's matcher on this step's inputs, then compute the bitmask
        of each constrained sampled row. ``resolve(refs)`` gives the host values of the previous
        step's sampled ids for input references. Returns (indices among the sampled rows,
        int32 bitmask [n, words]) or None when no sampled row is constrained."""
        t0 = time.perf_counter()
        gids = a["grammar_id"]
        rows = np.flatnonzero(gids)
        if not len(rows):
            return None
        keys = a["grammar_key"]
        slots = a["seq_slots"]
        cu = a["cu_seqlens"]
        positions = a["positions"]
        prompt_lens = a["prompt_lens"]
        ids = a["input_ids"]
        sample_mask = a["sample_mask"]
        sample_index = np.cumsum(sample_mask.astype(np.int64)) - 1
        out_rows: list[int] = []
        masks: list[np.ndarray] = []
        for r in rows.tolist():
            slot = int(slots[r])
            key = int(keys[r])
            row = self._rows.get(slot)
            if row is None or row.key != key:
                row = _Row(key, self._new_matcher(int(gids[r])))
                self._rows[slot] = row
            lo, hi = int(cu[r]), int(cu[r + 1])
            pos = positions[lo:hi]
            outs = np.flatnonzero(pos >= prompt_lens[r])
            # A stopped matcher allowed only EOS, which ended the sequence: what follows (the EOS
            # itself, fed by a step packed before the scheduler saw it) is past its end.
            if len(outs) and row.matcher is not None and not row.matcher.is_stopped():
                first = int(pos[outs[0]]) - int(prompt_lens[r])
                toks = ids[lo:hi][outs]
                if (toks < 0).any():
                    toks = toks.copy()
                    neg = toks < 0
                    toks[neg] = resolve(-toks[neg] - 1)
                if first != row.consumed:
                    log.error(
                        "grammar row in slot %d skipped tokens (%d fed, next is %d)",
                        slot,
                        row.consumed,
                        first,
                    )
                    row.matcher = None
                elif not row.matcher.consume_tokens(toks.tolist()):
                    # A token the mask allowed is always accepted; this is a forced token (a stop
                    # token id) or a bug. The row may only end from here.
                    log.warning("grammar matcher refused a token: %s", row.matcher.get_error())
                    row.matcher = None
                else:
                    row.consumed += len(toks)
            if sample_mask[r]:
                out_rows.append(int(sample_index[r]))
                masks.append(self._mask(row))
        self.ms_total += (time.perf_counter() - t0) * 1000
        self.rows_total += len(out_rows)
        if not out_rows:
            return None
        return np.asarray(out_rows, dtype=np.int64), np.stack(masks)

    def _mask(self, row: _Row) -> np.ndarray:
        m = row.matcher
        if m is not None and not m.is_error() and not m.is_stopped():
            words = np.frombuffer(m.compute_bitmask(), dtype=np.int32)
            # llguidance rounds its vocabulary up (a word more than the logits need, at times)
            if len(words) >= self.words:
                return words[: self.words]
            return np.concatenate([words, np.zeros(self.words - len(words), dtype=np.int32)])
        # Finished or failed: only EOS, so the sequence stops here.
        out = np.zeros(self.words, dtype=np.int32)
        for e in self._eos:
            out[e // 32] |= np.int32(np.uint32(1 << (e % 32)).astype(np.int32))
        return out

    def drop_slots(self) -> None:
        self._rows.clear()


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """``logits`` with -inf where a constrained row's bit is 0 (rows index logits' first axis)."""
    vocab = logits.shape[1]
    bits = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> bits) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab]
    sub = logits.index_select(0, rows).masked_fill(~allowed, float("-inf"))
    return logits.index_copy(0, rows, sub)
