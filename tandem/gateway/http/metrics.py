"""Prometheus metrics of one app: request counters and latency histograms measured in the gateway,
plus the scheduler's counters (queue, sequences, KV blocks, tokens, step timings) read from
``engine.stats()`` at scrape time. One registry per app, so two apps in a process never collide.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tandem.messages import Stats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _StatsCollector(Collector):
    """Turns each loaded model's last Stats snapshot into metric families with a ``model`` label
    (collected under the registry's lock)."""

    def __init__(self) -> None:
        self.models: dict[str, tuple[Stats | None, bool]] = {}  # model -> (stats, engine alive)

    def collect(self) -> Iterator[Metric]:
        alive = GaugeMetricFamily("tandem_worker_alive", "1 while the GPU worker is alive", labels=["model"])
        families: dict[str, Metric] = {}
        for model, (s, engine_alive) in self.models.items():
            alive.add_metric([model], int(engine_alive and s is not None and s.worker_alive))
            if s is None:
                continue
            for name, kind, doc, value in self._values(s):
                if name not in families:
                    families[name] = kind(name, doc, labels=["model"])
                families[name].add_metric([model], value)  # type: ignore[attr-defined]
        yield alive
        yield from families.values()

    @staticmethod
    def _values(s: Stats) -> Iterator[tuple[str, type, str, float]]:
        gauges = {
            "tandem_queue_depth": ("requests waiting to be scheduled", s.waiting),
            "tandem_queue_capacity": ("most requests that may wait before 'server busy'", s.max_queue),
            "tandem_running_sequences": ("sequences in the running batch", s.running),
            "tandem_kv_blocks_used": ("KV cache blocks held by sequences", s.kv_blocks_used),
            "tandem_kv_blocks_free": (
                "KV cache blocks free (cached ones included)",
                s.kv_blocks_total - s.kv_blocks_used,
            ),
            "tandem_kv_blocks_cached": ("KV cache blocks kept for prefix reuse", s.kv_blocks_cached),
            "tandem_kv_blocks_total": ("KV cache blocks in the pool", s.kv_blocks_total),
            "tandem_step_time_seconds": ("moving average of the time of one step", s.step_time_ms_avg / 1e3),
            "tandem_gpu_idle_seconds": (
                "moving average of the device's wait for each step's doorbell",
                s.gpu_idle_ms_avg / 1e3,
            ),
            "tandem_overlap_enabled": (
                "1 when steps overlap (scheduler prepares N+1 while N runs)",
                int(s.overlap),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield name, GaugeMetricFamily, doc, value
        counters = {
            "tandem_prompt_tokens": ("prompt tokens processed", s.prompt_tokens_total),
            "tandem_generation_tokens": ("tokens generated", s.generated_tokens_total),
            "tandem_prefix_cache_hit_tokens": (
                "prompt tokens served from the prefix cache",
                s.prefix_cache_hit_tokens,
            ),
            "tandem_prefix_cache_query_tokens": (
                "prompt tokens looked up in the prefix cache",
                s.prefix_cache_query_tokens,
            ),
            "tandem_steps": ("engine steps run", s.steps),
            "tandem_preemptions": ("sequences preempted for KV space", s.preemptions),
            "tandem_worker_restarts": ("times the GPU worker was restarted", s.worker_restarts),
            "tandem_grammar_mask_seconds": (
                "worker host time on grammar matchers (advance and mask) of constrained rows",
                s.grammar_ms_total / 1e3,
            ),
            "tandem_grammar_masked_rows": (
                "constrained rows masked (one per row per step)",
                s.grammar_rows_total,
            ),
        }
        for name, (doc, value) in counters.items():
            yield name, CounterMetricFamily, doc, value


class TokenRate:
    """Tokens per second streamed over the last ``window`` seconds."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._events: deque[tuple[float, int]] = deque()

    def add(self, n: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._events.append((now, n))
        self._prune(now)

    def per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._prune(now)
        if not self._events:
            return 0.0
        span = max(now - self._events[0][0], 1.0)
        return sum(n for _, n in self._events) / span

    def _prune(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window:
            self._events.popleft()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tandem_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.outcomes = Counter(
            "tandem_request_outcomes",
            "generation requests by how they ended",
            ["reason", "model"],
            registry=r,
        )
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds",
            "arrival to first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds",
            "time between generated tokens of one request",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tandem_request_duration_seconds",
            "arrival to the last frame of a generation request",
            ["model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.zmq_undecodable_frames = Counter(
            "tandem_zmq_undecodable_frames",
            "ZeroMQ frames with no request id that could be read, answered with an error frame",
            registry=r,
        )
        self._stats = _StatsCollector()
        r.register(self._stats)
        self.rate = TokenRate()

    def set_stats(self, models: dict[str, tuple[Stats | None, bool]]) -> None:
        """Every loaded model's snapshot (stats, engine alive): unloaded models drop out."""
        self._stats.models = models

    def render(self) -> bytes:
        return generate_latest(self.registry)
