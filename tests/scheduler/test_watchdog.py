"""The progress watchdog's arithmetic: expected step durations from measured ones."""

from __future__ import annotations

import pytest

from tandem.scheduler.watchdog import FIRST_STEP_FACTOR, JITTER_S, SLACK, StepWatchdog


def test_first_step_gets_a_generous_allowance() -> None:
    w = StepWatchdog(step_timeout=10.0)
    assert w.due_s(512) is None
    assert not w.hung(FIRST_STEP_FACTOR * 10.0 - 0.1, 512)
    assert w.hung(FIRST_STEP_FACTOR * 10.0 + 0.1, 512)


def test_expected_duration_scales_with_the_steps_tokens() -> None:
    w = StepWatchdog(step_timeout=2.0)
    for _ in range(20):
        w.observe(1, 20.0)  # one-token decodes of 20 ms
    assert w.due_s(1) == pytest.approx(SLACK * 0.020 + JITTER_S)
    # A 512-token prefill is expected to cost 512 decode tokens: never mistaken for a hang.
    assert w.due_s(512) == pytest.approx(SLACK * 512 * 0.020 + JITTER_S)
    assert not w.hung(25.0, 512)
    assert w.overdue_s(0.5, 1) == 0.0
    assert w.overdue_s(3.0, 1) == pytest.approx(3.0 - SLACK * 0.020 - JITTER_S)
    assert w.hung(3.0, 1) and not w.hung(2.0, 1)


def test_averages_follow_a_slower_machine() -> None:
    w = StepWatchdog(step_timeout=1.0)
    w.observe(8, 10.0)
    for _ in range(30):
        w.observe(8, 400.0)
    assert w.due_s(8) == pytest.approx(SLACK * 0.400 + JITTER_S, rel=0.01)
