"""Faults injected on purpose, for the tests that prove the scheduler survives them.

``EngineConfig.inject_fault`` (hidden CLI option ``--inject-fault``) holds ``KIND@STEP``:

- ``hang@N``: the compute thread blocks forever when step N arrives, while the heartbeat
  thread keeps beating: what a stuck kernel or a deadlocked library looks like from outside.
- ``raise@N``: step N's forward raises `InjectedFault`, as a failing kernel or an out-of-memory
  in the middle of a step would; the worker reports it and exits (loop.py).
- ``exit@N``: the process exits with code 3 at step N, without a word (a crash in native code).

Steps are numbered across worker restarts, so a restarted worker never meets step N again.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

_KINDS = ("hang", "raise", "exit")
EXIT_CODE = 3


class InjectedFault(RuntimeError):
    """What ``raise@N`` raises inside the step."""


class FaultPlan:
    def __init__(self, spec: str) -> None:
        self.kind = ""
        self.step = -1
        if not spec:
            return
        kind, sep, step = spec.partition("@")
        if kind not in _KINDS or not sep or not step.isdigit():
            raise ValueError(f"inject_fault must be KIND@STEP with KIND in {_KINDS}, got {spec!r}")
        self.kind, self.step = kind, int(step)

    def before_step(self, step: int) -> None:
        if step != self.step:
            return
        log.warning("injected fault: %s at step %d", self.kind, step)
        if self.kind == "hang":
            threading.Event().wait()
        elif self.kind == "raise":
            raise InjectedFault(f"injected fault in the forward of step {step}")
        elif self.kind == "exit":
            os._exit(EXIT_CODE)
