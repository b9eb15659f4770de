"""The scenarios `tandem stress` runs, by name. A new scenario (protocol fuzzing, fault
injection, ...) is one more entry: a function of a `StressParams` returning a ScenarioResult."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tandem.stress.result import ScenarioResult


@dataclass(frozen=True)
class StressParams:
    """``scale`` multiplies a scenario's bounded (CI) counts; ``duration_s``, when given, is how long
    a time-bounded scenario (the soak) runs instead of its count."""

    scale: float = 1.0
    duration_s: float | None = None


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    run: Callable[[StressParams], ScenarioResult]
    long_scale: float  # the scale `tandem stress` runs it at


def _load(p: StressParams) -> ScenarioResult:
    from tandem.stress import load

    return load.run(p.scale)


def _overflow(p: StressParams) -> ScenarioResult:
    from tandem.stress import overflow

    return overflow.run(p.scale)


def _slow_reader(p: StressParams) -> ScenarioResult:
    from tandem.stress import slow_reader

    return slow_reader.run(p.scale)


def _zmq_fuzz(p: StressParams) -> ScenarioResult:
    from tandem.stress import zmq_fuzz_scenario

    return zmq_fuzz_scenario.run(p.scale)


def _soak(p: StressParams) -> ScenarioResult:
    from tandem.stress import soak

    return soak.run(p.scale, p.duration_s)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "load", "256 ZeroMQ + 256 HTTP streams at once: one terminal frame each, outputs = solo", _load, 4
        ),
        Scenario(
            "overflow",
            "40 at once over --max-queue 16: busy at once, no resets, the rest finish",
            _overflow,
            3,
        ),
        Scenario(
            "slow_reader",
            "readers that stop: bounded memory, cancelled after --send-timeout",
            _slow_reader,
            2,
        ),
        Scenario(
            "zmq_fuzz",
            "seeded ZeroMQ protocol fuzzing: every case answered or its peer dropped, no internal errors",
            _zmq_fuzz,
            5,
        ),
        Scenario(
            "soak", "10,000 short requests of every kind on two models: no growth, KV all free", _soak, 25
        ),
    )
}
