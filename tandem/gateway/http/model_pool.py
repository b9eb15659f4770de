"""The models one `tandem serve` runs: each its own engine (scheduler + worker, ring, KV pool),
loaded on demand behind the one gateway, unloaded when its keep-alive runs out, evicted (idle ones,
least recently used first) when a new one needs the memory.

A load runs in a task of its own and its spawn in a thread, so requests to loaded models never
wait for it; requests for the loading model all await the same task. The model given to
``serve --model`` is resident: the ZeroMQ front end serves it, so it is never unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Receive, Scope, Send

from tandem.engine.aio import AsyncEngine
from tandem.gateway.http.errors import ApiError
from tandem.gateway.http.params import bad

if TYPE_CHECKING:
    from tandem.config import EngineConfig
    from tandem.gateway.http.state import Gateway

log = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.2
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any, param: str = "keep_alive") -> float | None:
    """Seconds to keep a model loaded after a request, None for forever. ollama's forms: a
    duration string ("5m", "1h30m", "0"), a number of seconds, or a negative number (forever)."""
    if isinstance(value, bool):
        raise bad(param, "must be a duration such as '5m', a number of seconds, or -1")
    if isinstance(value, int | float):
        return None if value < 0 else float(value)
    if isinstance(value, str):
        text = value.strip()
        with contextlib.suppress(ValueError):
            return parse_keep_alive(float(text), param)
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        parts = _DURATION_PART.findall(body)
        if body and "".join(n + u for n, u in parts) == body:
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
            return None if seconds < 0 else seconds
    raise bad(param, f"must be a duration such as '5m', a number of seconds, or -1, not {value!r}")


def available_memory() -> int:
    """Bytes the kernel says can be had without swapping (MemAvailable)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def gpu_free_memory(device: str) -> int | None:
    """Free bytes on CUDA ``device`` ("cuda", "cuda:N") from nvidia-smi, None when it cannot tell.
    Not torch: a CUDA context in the gateway would itself take GPU memory."""
    index = device.partition(":")[2] or "0"
    query = ["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", index]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=5, check=True).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def estimate_bytes(model_path: str, kv_cache_memory: int) -> int:
    """A model's memory plan before loading it: its weights files plus the KV budget."""
    if os.path.isdir(model_path):
        weights = sum(e.stat().st_size for e in os.scandir(model_path) if e.is_file())
    else:
        weights = os.path.getsize(model_path)
    return weights + kv_cache_memory


def plan_bytes(plan: dict[str, Any]) -> int:
    """What a worker's memory plan holds: weights as loaded (dense copies of packed layers
    included) and the KV pool; 0 for a plan not yet known."""
    return int(plan.get("weights_bytes", 0)) + int(plan.get("kv_cache_bytes", 0))


def resident_bytes(ready_info: dict[str, Any], estimate: int) -> int:
    """What a loaded model holds: its worker's own plan where that is more than the estimate made
    before loading."""
    return max(estimate, plan_bytes(ready_info.get("memory_plan") or {}))


@dataclass
class Loaded:
    name: str
    key: str  # the weights file's real path: derived models and aliases share an engine
    gw: Gateway
    estimate: int
    resident: bool = False
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive: float | None = None  # seconds after the last request, None for forever
    expires_at: float | None = None  # wall-clock time, None for never
    unload_when_idle: bool = False

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.gw.engine.num_active == 0

    def touch(self, keep_alive: float | None) -> None:
        self.last_used = time.monotonic()
        self.keep_alive = keep_alive
        self.expires_at = None if keep_alive is None else time.time() + keep_alive


def startup_shortfall(cfg: EngineConfig, memory_limit: int) -> str | None:
    """Why the server's own model cannot fit (weights and KV cache past --memory-limit, or past
    the memory there is), before anything is started; None when it can."""
    need = estimate_bytes(cfg.model_path, cfg.kv_cache_memory)
    name = cfg.model_name or cfg.model_path
    if memory_limit:
        if need > memory_limit:
            why = f"needs {need} bytes (weights and KV cache), past --memory-limit {memory_limit}"
            return f"model '{name}' {why}"
        return None
    free = gpu_free_memory(cfg.device) if cfg.device.startswith("cuda") else available_memory()
    if free is not None and need > free:
        return f"model '{name}' needs {need} bytes (weights and KV cache) and {free} bytes are available"
    return None


class ModelPool:
    def __init__(
        self,
        default: Gateway,
        keep_alive: float | None,
        max_loaded: int = 0,
        memory_limit: int = 0,
    ) -> None:
        self.base_cfg = default.engine.cfg
        self.keep_alive = keep_alive
        self.max_loaded = max_loaded  # 0: as many as the memory budget fits
        self.memory_limit = memory_limit  # 0: what the system has available
        cfg = self.base_cfg
        first = Loaded(
            default.model_name,
            os.path.realpath(cfg.model_path),
            default,
            estimate_bytes(cfg.model_path, cfg.kv_cache_memory),
            resident=True,
        )
        self.loaded: dict[str, Loaded] = {first.key: first}
        self._loading: dict[str, asyncio.Task[Loaded]] = {}
        self._reserved: dict[str, int] = {}  # bytes planned for loads under way
        self._plan_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._unloads: set[asyncio.Task[None]] = set()
        self._closing = False
        # (name, why) of a model whose engine gave up, unloaded since (serve then stops)
        self.failed: tuple[str, str] | None = None

    @property
    def default(self) -> Loaded:
        return next(m for m in self.loaded.values() if m.resident)

    def entries(self) -> list[Loaded]:
        return sorted(self.loaded.values(), key=lambda m: (not m.resident, m.name))

    def find(self, name: str) -> Loaded | None:
        """The loaded model that answers to ``name`` (its own name or an alias)."""
        return next((m for m in self.loaded.values() if m.gw.serves(name)), None)

    def entry_of(self, gw: Gateway) -> Loaded | None:
        return next((m for m in self.loaded.values() if m.gw is gw), None)

    # -- loading ---------------------------------------------------------------------------------
    async def get(self, name: str, model_path: str) -> Loaded:
        """The loaded model for weights ``model_path``, loading it (as ``name``) when it is not."""
        self._start_reaper()
        key = os.path.realpath(model_path)
        if (hit := self.loaded.get(key)) is not None:
            return hit
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(name, model_path, key), name=f"load-{name}")
            self._loading[key] = task
            task.add_done_callback(lambda _t: self._loading.pop(key, None))
        # A requester that leaves does not cancel the load others may be waiting on.
        return await asyncio.shield(task)

    async def _load(self, name: str, model_path: str, key: str) -> Loaded:
        from tandem.gateway.http.state import Gateway

        cfg = replace(self.base_cfg, model_path=model_path, model_name=name, runtime_dir=None)
        need = estimate_bytes(model_path, cfg.kv_cache_memory)
        async with self._plan_lock:
            await self._make_room(name, need)
            self._reserved[key] = need
        engine = AsyncEngine(cfg)
        try:
            t0 = time.perf_counter()
            await engine.start()
            log.warning("loaded %s in %.2f s", name, time.perf_counter() - t0)
        except BaseException as e:
            self._reserved.pop(key, None)
            with contextlib.suppress(Exception):
                await engine.close()
            if isinstance(e, Exception):
                raise ApiError(500, f"cannot load model '{name}': {e}", code="load_failed") from None
            raise
        entry = Loaded(name, key, Gateway(engine, self.default.gw.settings, shared=self.default.gw), need)
        entry.touch(self.keep_alive)
        self._reserved.pop(key, None)
        if self._closing:
            await engine.close()
            raise ApiError(503, "server is shutting down", code="shutting_down")
        self.loaded[key] = entry
        return entry

    def _used(self) -> int:
        held = sum(resident_bytes(m.gw.engine.ready_info, m.estimate) for m in self.loaded.values())
        return held + sum(self._reserved.values())

    def _free(self) -> int:
        if self.memory_limit:
            return self.memory_limit - self._used()
        # What the kernel (or the GPU) reports already lacks what loaded models took; not what
        # loads under way are about to take.
        free = None
        if self.base_cfg.device.startswith("cuda"):
            free = gpu_free_memory(self.base_cfg.device)
        if free is None:
            free = available_memory()
        return free - sum(self._reserved.values())

    async def _make_room(self, name: str, need: int) -> None:
        """Evict idle models, least recently used first, until ``need`` bytes and a model slot are
        free; 503 naming the sizes when even evicting every idle one would not do."""
        while True:
            count = len(self.loaded) + len(self._reserved)
            free = self._free()
            if free >= need and (not self.max_loaded or count < self.max_loaded):
                return
            idle = sorted(
                (m for m in self.loaded.values() if not m.resident and m.idle), key=lambda m: m.last_used
            )
            if not idle:
                break
            log.warning("evicting %s (idle) to load %s", idle[0].name, name)
            await self.unload(idle[0])
        if free < need:
            msg = (
                f"cannot load model '{name}': it needs {need} bytes (weights and KV cache) and "
                f"{max(free, 0)} bytes are available after evicting every idle model"
            )
        else:
            msg = (
                f"cannot load model '{name}': {self.max_loaded} models are loaded "
                "(--max-loaded-models) and none of them is idle"
            )
        raise ApiError(503, msg, code="insufficient_memory")

    # -- leases ----------------------------------------------------------------------------------
    def acquire(self, entry: Loaded) -> None:
        entry.in_flight += 1
        entry.last_used = time.monotonic()

    def release(self, entry: Loaded, keep_alive: float | str | None) -> None:
        """A request on ``entry`` ended; its keep_alive ("default": the server's) starts counting."""
        entry.in_flight -= 1
        entry.touch(self.keep_alive if keep_alive == "default" else keep_alive)  # type: ignore[arg-type]
        entry.unload_when_idle = entry.keep_alive == 0  # the last request's keep_alive wins
        self._reap_now()

    async def unload(self, entry: Loaded, only_if_idle: bool = False) -> None:
        """Stop ``entry``'s engine (its processes, ring, KV pool, socket files). ``only_if_idle``:
        not if a request took it meanwhile (the reaper decided before this ran)."""
        if only_if_idle and not entry.idle and entry.gw.engine.dead is None:
            return
        if entry.resident:
            log.info("keep_alive asks to unload %s; the server's own model stays loaded", entry.name)
            entry.unload_when_idle = False
            return
        if self.loaded.get(entry.key) is not entry:
            return
        del self.loaded[entry.key]
        if entry.gw.engine.dead is not None and self.failed is None:
            self.failed = (entry.name, entry.gw.engine.dead)
        log.warning("unloading %s", entry.name)
        await entry.gw.engine.close()

    # -- expiry ----------------------------------------------------------------------------------
    def _start_reaper(self) -> None:
        if self._reaper is None and not self._closing:
            self._reaper = asyncio.create_task(self._reap_loop(), name="model-reaper")

    def _due(self) -> list[Loaded]:
        now = time.time()
        due = []
        for m in self.loaded.values():
            if m.resident:
                continue
            if m.gw.engine.dead is not None:
                due.append(m)
            elif m.idle and (m.unload_when_idle or (m.expires_at is not None and now >= m.expires_at)):
                due.append(m)
        return due

    def _reap_now(self) -> None:
        for m in self._due():
            task = asyncio.get_running_loop().create_task(self.unload(m, only_if_idle=True))
            self._unloads.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._unloads.discard)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            for m in self._due():
                try:
                    await self.unload(m, only_if_idle=True)
                except Exception:  # the reaper must outlive one engine's bad close
                    log.exception("unloading %s failed", m.name)

    async def close(self, drain: bool = False, timeout: float = 30.0) -> None:
        """Stop every model but the resident one (the server closes that itself)."""
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for task in [*self._loading.values(), *self._unloads]:
            with contextlib.suppress(BaseException):
                await task
        others = [m for m in self.loaded.values() if not m.resident]
        for m in others:
            del self.loaded[m.key]
        await asyncio.gather(
            *(m.gw.engine.close(drain=drain, timeout=timeout) for m in others), return_exceptions=True
        )


class LeaseMiddleware:
    """Ends the leases a request took on models (routes add them to ``scope["state"]``) once its
    response is over, streams included, so a model with a request in flight is never evicted."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[tuple[ModelPool, Loaded, Any]] = []
        scope.setdefault("state", {})["model_leases"] = leases
        try:
            await self.app(scope, receive, send)
        finally:
            for pool, entry, keep_alive in leases:
                pool.release(entry, keep_alive)
