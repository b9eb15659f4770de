"""`tandem stress`: runs the registered scenarios at their long scale (or --scale), prints their
figures, writes --output JSON, exits 1 when a check failed, and refuses bad options clearly.
The scenarios themselves are tested in the other files here; this one registers small stand-ins
(the registry is the extension point other scenarios use)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tandem.cli import main
from tandem.stress import registry
from tandem.stress.result import ScenarioResult


def _fake(passes: bool, seen: list[registry.StressParams]):
    def run(p: registry.StressParams) -> ScenarioResult:
        seen.append(p)
        r = ScenarioResult("fake")
        r.add("requests", 10 * p.scale)
        r.add("p99", 12.5, "ms")
        r.check(passes, "it broke")
        return r

    return run


def test_runs_prints_and_writes_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[registry.StressParams] = []
    monkeypatch.setattr(
        registry, "SCENARIOS", {"fake": registry.Scenario("fake", "a stand-in", _fake(True, seen), 3)}
    )
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["stress", "--duration", "1m30s", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert seen == [registry.StressParams(3, 90.0)]
    assert "requests" in r.output and "30" in r.output and "12.5 ms" in r.output and "passed" in r.output
    data = json.loads(out.read_text())
    assert data[0]["scenario"] == "fake" and data[0]["passed"]
    assert data[0]["figures"]["p99"] == {"value": 12.5, "unit": "ms"}


def test_a_failed_check_or_a_crash_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(p: registry.StressParams) -> ScenarioResult:
        raise TimeoutError("the server did not go idle")

    monkeypatch.setattr(
        registry,
        "SCENARIOS",
        {
            "bad": registry.Scenario("bad", "fails a check", _fake(False, []), 1),
            "crash": registry.Scenario("crash", "raises", crash, 1),
        },
    )
    r = CliRunner().invoke(main, ["stress", "--scale", "1"])
    assert r.exit_code == 1
    assert "FAILED: it broke" in r.output
    assert "FAILED: TimeoutError: the server did not go idle" in r.output


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--duration", "ten"], "--duration"),
        (["--duration", "0"], "--duration"),
        (["--scenario", "x"], "scenario"),
    ],
)
def test_bad_options_are_named(args: list[str], names: str) -> None:
    r = CliRunner().invoke(main, ["stress", *args])
    assert r.exit_code == 2 and names in r.output, r.output


def test_every_builtin_scenario_is_registered() -> None:
    assert {"load", "overflow", "slow_reader", "soak", "zmq_fuzz"} <= set(registry.SCENARIOS)
