"""Smoke test of `tandem bench`: the scheduler section on the tiny model, quick sizes."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tandem.cli import main


def test_bench_scheduler_section_reports_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--quick", "--section", "scheduler", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Scheduler CPU per step" in result.stdout

    data = json.loads(out.read_text())
    assert data["sections"] == ["scheduler"]
    assert {"date", "torch", "cpu_count"} <= set(data["machine"])
    assert "pipeline-tiny" not in data and "model-stack" not in data

    sched = data["scheduler"]
    # Every sequence was decoding in the measured steps: none finished or was preempted early.
    assert sched["decode_batch"] == [sched["sizes"]["num_seqs"]] == [256]
    assert set(sched["phases"]) == {"schedule", "pack", "results", "total"}
    for phase in sched["phases"].values():
        for clock in ("cpu_ms", "wall_ms"):
            assert phase[clock]["n"] == sched["sizes"]["steps"]
            assert phase[clock]["median"] > 0
    assert isinstance(sched["meets_target"], bool)
    if sched["hotspots"] is not None:  # profiled only when the target is missed
        assert {"function", "calls_per_step", "tottime_us_per_step"} <= set(sched["hotspots"][0])
