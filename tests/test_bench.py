"""`tandem bench`: the scheduler section on the tiny model, and the race of tandem serve against
transformers and llama-server (real servers, real HTTP) on the tiny shape."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from procs import children, running

from tandem.bench.llamacpp import find_llama_server
from tandem.bench.samples import RUN_FIELDS
from tandem.cli import main
from tandem.formats.synthetic import SHAPES, write_synthetic_gguf


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


# -- the race: tandem serve (overlap, sync), transformers and llama-server in one run ------------


def _race(tmp_path: Path, *args: str) -> tuple[dict[str, Any], Any]:
    out = tmp_path / "race.json"
    before = children(os.getpid())  # e.g. multiprocessing's resource tracker, from earlier tests
    result = CliRunner().invoke(
        main,
        ["bench", "--synthetic", "tiny", "--gen-len", "16", "--repeats", "1", "--output", str(out), *args],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    left = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in children(os.getpid()) - before}
    assert not left, f"the race left processes running: {left}"
    return json.loads(out.read_text()), result


def _spans(trace: dict[str, Any], process_label: str, kind: str) -> dict[int, tuple[float, float]]:
    """{step: (start, end)} of one kind of span ("prep", "compute") of the processes so named."""
    pids = {
        e["pid"]
        for e in trace["traceEvents"]
        if e["ph"] == "M" and e["name"] == "process_name" and e["args"]["name"].startswith(process_label)
    }
    return {
        e["args"]["step"]: (e["ts"], e["ts"] + e["dur"])
        for e in trace["traceEvents"]
        if e["ph"] == "X" and e["pid"] in pids and e["name"].startswith(kind + " ")
    }


def _prep_beside_compute(trace: dict[str, Any], label: str) -> list[int]:
    """Steps N whose compute (worker) overlaps the scheduler's prep of N+1."""
    prep, compute = _spans(trace, f"{label}: scheduler", "prep"), _spans(trace, f"{label}: worker", "compute")
    assert prep and compute, f"no {label} spans in the trace"
    return [n for n, (a, b) in compute.items() if n + 1 in prep and prep[n + 1][0] < b and prep[n + 1][1] > a]


def test_race_on_the_tiny_model_writes_json_plot_and_trace(tmp_path: Path) -> None:
    """sync, overlap and hf race on the tiny shape: every field of every run, a PNG, and a trace in
    which overlap's scheduler prepares step N+1 while its worker computes N (and sync's never)."""
    plot, trace_path = tmp_path / "race.png", tmp_path / "trace.json"
    doc, result = _race(
        tmp_path,
        "--batch-sizes",
        "1,4",
        "--modes",
        "sync,overlap,hf",
        "--plot",
        str(plot),
        "--trace",
        str(trace_path),
    )
    assert "tandem/hf" in result.stdout and "overlap/sync" in result.stdout

    assert {"cpu_model", "cores", "torch", "date"} <= set(doc["machine"])
    assert doc["model"]["name"] == "synthetic:tiny" and doc["model"]["num_layers"] == 4
    assert [(r["mode"], r["batch_size"]) for r in doc["runs"]] == [
        (m, b) for b in (1, 4) for m in ("sync", "overlap", "hf")
    ]
    for run in doc["runs"]:
        assert set(RUN_FIELDS) <= set(run), run
        assert run["tokens_per_s"] > 0 and run["ttft_ms"] > 0
        (sample,) = run["samples"]
        assert sample["tokens"] == 16 * run["batch_size"]  # ignore_eos: every token asked for
        tandem = run["mode"] in ("sync", "overlap")
        # Step figures come from tandem's own step trace; transformers has no such split.
        for key in ("sched_ms_per_step", "worker_ms_per_step", "gpu_idle_frac"):
            assert (run[key] is not None) == tandem, (run["mode"], key)
        if tandem:
            assert sample["steps"] >= 16 and run["worker_ms_per_step"] > 0 and 0 <= run["gpu_idle_frac"] < 1
    ratios = {r["batch_size"]: r for r in doc["ratios"]}
    assert set(ratios) == {1, 4}
    assert (
        ratios[1]["overlap/sync"] > 0 and ratios[1]["tandem/hf"] > 0 and ratios[1]["tandem/llama.cpp"] is None
    )

    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000

    trace = json.loads(trace_path.read_text())
    processes = {
        e["args"]["name"].split(" (")[0] for e in trace["traceEvents"] if e["name"] == "process_name"
    }
    assert processes == {"sync: scheduler", "sync: worker", "overlap: scheduler", "overlap: worker"}
    assert _prep_beside_compute(trace, "overlap"), "overlap never prepared a step while the worker computed"
    assert _prep_beside_compute(trace, "sync") == []  # sync prepares N+1 only after N's result
    pids = {e["pid"] for e in trace["traceEvents"]}
    assert len(pids) == 4 and not any(running(p) for p in pids), "a scheduler or worker outlived the race"


@pytest.mark.skipif(find_llama_server() is None, reason="no llama-server binary: set TANDEM_LLAMA_SERVER")
def test_race_against_llama_server(tmp_path: Path) -> None:
    """llama-server on the same file, restarted per batch size with -np B, the same HTTP requests."""
    binary = find_llama_server()
    doc, result = _race(
        tmp_path, "--batch-sizes", "1,2", "--modes", "overlap,llama.cpp", "--llama-server", str(binary)
    )
    runs = {(r["mode"], r["batch_size"]): r for r in doc["runs"]}
    for b in (1, 2):
        llama = runs[("llama.cpp", b)]
        assert llama["tokens_per_s"] > 0 and llama["samples"][0]["tokens"] == 16 * b
        assert llama["sched_ms_per_step"] is None and llama["gpu_idle_frac"] is None
    assert all(r["tandem/llama.cpp"] > 0 for r in doc["ratios"])
    assert "tandem/llama.cpp" in result.stdout


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--modes", "sync,llama.cpp"], "--llama-server"),
        (["--modes", "sync,turbo"], "turbo"),
        (["--llama-server", "/nonexistent/llama-server"], "no such file"),
        (["--synthetic", "llama-3.1-8b"], "--device cuda"),
        (["--prompt-len", "500", "--gen-len", "64"], "--context-len 512"),
        (["--batch-sizes", "1,x"], "not a comma-separated list of integers"),
        (["--section", "scheduler", "--gen-len", "8"], "--section race"),
        (["--trace", "t.json", "--modes", "hf"], "it needs overlap or sync"),
    ],
)
def test_race_options_are_checked_before_anything_runs(args: list[str], names: str) -> None:
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2, result.output
    assert names in result.output


def test_synthetic_shapes_load_with_the_real_geometry(tmp_path: Path) -> None:
    """The random-weight smollm2-135m file has the real model's shapes and tokenizes text."""
    from tandem.tokenizer.model_files import read_config_and_tokenizer

    path = write_synthetic_gguf(tmp_path / "s.gguf", "smollm2-135m")
    config, tok = read_config_and_tokenizer(path)
    shape = SHAPES["smollm2-135m"]
    got = (config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads)
    assert got == (30, 576, 1536, 9) and config.num_kv_heads == 3 and config.vocab_size == 49152
    assert (
        config.tie_word_embeddings and abs(path.stat().st_size - shape.file_bytes) < 0.05 * shape.file_bytes
    )
    ids = tok.encode("hello world")
    assert ids and tok.decode(ids) == "hello world"


def test_step_figures_split_scheduler_worker_and_idle_time() -> None:
    """Per-run figures from trace rows: means per step, idle = the gaps between worker spans."""
    from tandem.bench.trace import step_figures

    ms = 1_000_000
    # step, seqs, tokens, prep start/end, sent, worker start/end, result start/end (ns)
    rows = [
        [0, 1, 4, 0, 1 * ms, 1 * ms, 2 * ms, 10 * ms, 11 * ms, 12 * ms],
        [1, 1, 1, 9 * ms, 10 * ms, 11 * ms, 12 * ms, 20 * ms, 21 * ms, 23 * ms],
    ]
    f = step_figures(rows)
    assert f is not None and f.steps == 2
    assert f.sched_ms_per_step == pytest.approx((1 + 1 + 2 + 2) / 2)  # (prep + apply) per step
    assert f.worker_ms_per_step == pytest.approx((8 + 8) / 2)
    assert f.gpu_idle_frac == pytest.approx(2 / 18)  # idle 10->12 ms of the worker's 2->20 ms span
    assert step_figures([[0, 1, 1, 0, 1, 1, 0, 0, 2, 3]]) is None  # the worker never stamped it


def test_decode_step_bench_runs_on_the_tiny_shape(tmp_path: Path) -> None:
    """benchmarks/bench_decode.py drives the worker's own planning and forward: a slot field the
    worker starts reading must reach the bench's synthetic slot too, or the bench stops running."""
    import importlib.util

    script = Path(__file__).parents[1] / "benchmarks" / "bench_decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", script)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "decode.json"
    assert bench.main(["--quick", "--contexts", "32,64", "--json-out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [o["batch"] for o in r["ops_per_layer"]] == [1, 8]
    assert all(o["kernels_per_layer"] > 0 for o in r["ops_per_layer"])
    assert set(r["context_scaling"]["tokens_per_s"]) == {"32", "64"}
