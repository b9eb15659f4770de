"""One request's life inside the scheduler: its tokens, progress, and where it stands."""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from tandem.messages import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_len: int
    token_ids: list[int]  # prompt + every generated token known so far
    params: SamplingParams
    seed: int
    max_tokens: int  # resolved: never past the context
    arrival_time: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    # Tokens whose KV is written or scheduled to be written (in-flight steps included).
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens served by the prefix cache at first admission
    # The overlap pipeline: tokens sampled by in-flight steps, oldest first, as (step, row in
    # that step's batch). The next step refers to the newest one before its value is known.
    pending: deque[tuple[int, int]] = field(default_factory=deque)
    # Bumped on preemption, so results of steps scheduled before it are recognized as stale.
    epoch: int = 0
    worker_slot: int = -1  # row of the worker's per-sequence state
    replays: int = 0  # times requeued after losing its worker before sending any token
    first_token_time: float = 0.0
    admitted_time: float = 0.0
    # Tokens computed (known ones only) at which the next full block can be committed to the prefix
    # cache: (blocks hashed + 1) * block_size, 0 when unknown. Spares the scheduler a
    # commit_full_blocks call per sequence per step; only ever low, never past the real threshold.
    next_commit: int = 0
    # Constant per-row ring values, filled by batch.py when the sequence is first packed.
    packed_params: tuple | None = None
    grammar_id: int = 0  # the worker's id of its grammar (GrammarSpec), 0: unconstrained
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # An embedding: its whole prompt runs in one step, samples nothing, and is answered with the
    # pooled vector; it never shares or leaves prefix-cache blocks.
    embed: bool = False
    prompt_lps_sent: int = 0  # echo: prompt positions whose logprobs are sent (a recompute skips them)

    @property
    def num_outputs(self) -> int:
        """Generated tokens, counting one still in flight."""
        return len(self.token_ids) - self.prompt_len + len(self.pending)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + len(self.pending)

    @property
    def tokens_to_feed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def done_generating(self) -> bool:
        """Every token it may produce is sampled or in flight: nothing more to schedule."""
        return self.num_outputs >= self.max_tokens
