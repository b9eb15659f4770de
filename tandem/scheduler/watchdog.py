"""Is the worker making progress? Heartbeats prove that its process lives, not that its steps end.

A worker whose compute thread hangs (a stuck kernel, a deadlock in a library) keeps sending
heartbeats from its own thread, so the scheduler also watches the oldest step in flight:

- Its *expected* duration comes from what steps actually took on this worker:
  ``max(ms per step, ms per batched token x the step's tokens)``, both running averages of
  the worker's own forward times. A step of 512 prefill tokens after a run of one-token decodes
  is thus expected to take 512 times a decode's per-token cost, a large overestimate on any
  hardware, so that a big prefill on a slow CPU is never taken for a hang.
- It is *overdue* once it has run 3x its expected duration (plus 0.5 s of jitter); `/health`
  then says ``degraded``.
- It is *hung* once it is overdue by ``step_timeout`` seconds (``--step-timeout``, 10 s by
  default); the scheduler then handles the worker as crashed: it kills it, fails what it held
  and restarts it.
- Before this worker has finished any step there is nothing to expect; the first step may also
  pay one-time initialisation, so it gets ``FIRST_STEP_FACTOR x step_timeout``.

A step's clock starts when it can start: when it was sent, or when the step before it returned,
whichever is later (with overlap, step N+1 waits in the queue while N computes).
"""

from __future__ import annotations

from dataclasses import dataclass

SLACK = 3.0
JITTER_S = 0.5
FIRST_STEP_FACTOR = 6.0
_ALPHA = 0.2


@dataclass
class StepWatchdog:
    step_timeout: float
    ms_per_step: float = 0.0
    ms_per_token: float = 0.0

    def observe(self, num_tokens: int, forward_ms: float) -> None:
        """A step of ``num_tokens`` batched tokens took ``forward_ms`` on the worker."""
        per_token = forward_ms / max(1, num_tokens)
        if self.ms_per_step == 0.0:
            self.ms_per_step, self.ms_per_token = forward_ms, per_token
            return
        self.ms_per_step += _ALPHA * (forward_ms - self.ms_per_step)
        self.ms_per_token += _ALPHA * (per_token - self.ms_per_token)

    def due_s(self, num_tokens: int) -> float | None:
        """Seconds after which a step of ``num_tokens`` is overdue; None before any measurement."""
        if self.ms_per_step == 0.0:
            return None
        expected_ms = max(self.ms_per_step, self.ms_per_token * num_tokens)
        return SLACK * expected_ms / 1000 + JITTER_S

    def overdue_s(self, age_s: float, num_tokens: int) -> float:
        """How far past due a step running for ``age_s`` is (0 when it is not)."""
        due = self.due_s(num_tokens)
        if due is None:
            due = (FIRST_STEP_FACTOR - 1) * self.step_timeout
        return max(0.0, age_s - due)

    def hung(self, age_s: float, num_tokens: int) -> bool:
        return self.overdue_s(age_s, num_tokens) > self.step_timeout
