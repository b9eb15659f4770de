"""The race's `overlap` and `sync` modes: a real `tandem serve` subprocess each (the second with
`--no-overlap`), driven over HTTP, with the step trace on so each run's scheduler and worker time
per step comes from the server's own timestamps.

Each server gets a TANDEM_HOME of its own (its store entry for the model file, its run files),
so the two never meet each other or a server the user runs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from tandem.bench.http_load import run_http_batch
from tandem.bench.samples import BenchError, RunSample
from tandem.bench.server_process import ServerProcess, free_port
from tandem.bench.trace import TracedServer, step_figures
from tandem.config import DEFAULT_KV_CACHE_MEMORY

log = logging.getLogger(__name__)

# Steps of trace kept by each server: several runs' worth even at batch 256.
TRACE_CAPACITY = 16384
DEFAULT_MAX_NUM_SEQS = 64


def kv_cache_bytes(bytes_per_token: int, max_batch: int, tokens_per_seq: int, block_size: int = 16) -> int:
    """tandem's default KV budget, or more when the largest batch would not fit in it."""
    blocks = -(-tokens_per_seq // block_size) + 1
    need = bytes_per_token * max_batch * blocks * block_size
    return max(DEFAULT_KV_CACHE_MEMORY, int(need * 1.25))


class TandemServeMode:
    def __init__(
        self,
        name: str,
        model_path: Path,
        workdir: Path,
        *,
        overlap: bool,
        threads: int | None,
        device: str,
        context_len: int,
        max_batch: int,
        kv_bytes: int,
    ) -> None:
        self.name = name
        home = workdir / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "tandem.cli", "serve", "--model", str(model_path)]
        cmd += ["--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--device", device]
        cmd += ["--num-ctx", str(context_len), "--max-num-seqs", str(max(DEFAULT_MAX_NUM_SEQS, max_batch))]
        cmd += ["--kv-cache-memory", f"{-(-kv_bytes // 2**20)}M", "--trace-steps", str(TRACE_CAPACITY)]
        cmd += ["--threads", str(threads)] if threads else []
        cmd += [] if overlap else ["--no-overlap"]
        env = {**os.environ, "TANDEM_HOME": str(home)}
        self.server = ServerProcess(f"tandem serve ({name})", cmd, workdir / f"serve-{name}.log", env)
        self.model: str | None = None
        self.next_step = 0
        self.pids = (0, 0)
        self.rows: list[list[int]] = []  # every measured run's steps, for --trace

    def start(self) -> None:
        self.server.start()

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        self.server.wait_ready(self.url + "/", timeout_s)
        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as c:
            self.model = c.get("/v1/models").json()["data"][0]["id"]
            steps = self._trace(c, 0)["steps"]
        self.next_step = steps[-1][0] + 1 if steps else 0

    def prepare(self, batch_size: int) -> None:
        """Nothing to do: one server serves every batch size."""

    def _trace(self, client: httpx.Client, since: int) -> dict[str, Any]:
        r = client.get("/api/trace", params={"since": since})
        if r.status_code != 200:
            raise BenchError(f"{self.server.name}: GET /api/trace: HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def run(self, prompts: list[list[int]], gen_len: int, keep_trace: bool) -> RunSample:
        sample = run_http_batch(self.url, prompts, gen_len, self.model)
        with httpx.Client(base_url=self.url, timeout=10, trust_env=False) as c:
            trace = self._trace(c, self.next_step)
        rows = trace["steps"]
        if rows:
            self.next_step = rows[-1][0] + 1
        self.pids = (trace["scheduler_pid"], trace["worker_pid"])
        figures = step_figures(rows)
        if figures is not None:
            sample.steps = figures.steps
            sample.sched_ms_per_step = figures.sched_ms_per_step
            sample.worker_ms_per_step = figures.worker_ms_per_step
            sample.gpu_idle_frac = figures.gpu_idle_frac
        if keep_trace:
            self.rows += rows
        return sample

    def describe(self) -> dict[str, Any]:
        return {"command": self.server.cmd}

    def traced(self) -> TracedServer:
        return TracedServer(self.name, self.pids[0], self.pids[1], self.rows)

    def close(self) -> None:
        self.server.stop()
