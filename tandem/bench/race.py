"""`tandem bench` race: tandem serve (overlap, sync) against transformers and llama-server, one run.

Every mode serves the same model file and gets the same prompts (token ids, `prompt_len` each,
a distinct start per run and request so no run is served from another's prompt cache). Runs
alternate mode by mode (A B C A B C ...), one unmeasured warm-up round first, per batch size, so
drift on a shared machine lands on every mode; each figure is the median over the repeats.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tandem.bench.samples import BenchError, RunSample, summarize_runs
from tandem.bench.timing import ratio

log = logging.getLogger(__name__)

MODES = ("sync", "overlap", "hf", "llama.cpp")
TANDEM_MODES = ("overlap", "sync")
DEFAULT_MODEL = "smollm2:135m"
_TEXT = "The quick brown fox jumps over the lazy dog while the sea rolls on and on. "


class Mode(Protocol):
    name: str

    def start(self) -> None: ...
    def wait_ready(self) -> None: ...
    def prepare(self, batch_size: int) -> None: ...
    def run(self, prompts: list[list[int]], gen_len: int, keep_trace: bool) -> RunSample: ...
    def describe(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class RaceOptions:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    prompt_len: int = 32
    gen_len: int = 64
    context_len: int = 512  # per sequence: tandem's --num-ctx, llama-server's -c B*this
    modes: tuple[str, ...] | None = None  # None: default_modes()
    repeats: int = 3
    model: str | None = None  # a store name or path; None: smollm2:135m (unless synthetic)
    synthetic: str | None = None  # a tandem.formats.synthetic shape instead of a model file
    llama_server: Path | None = None
    threads: int | None = None  # tandem's worker threads (None: the engine's default)
    baseline_threads: int | None = None  # hf's torch threads and llama-server's -t (None: as tandem's)
    device: str = "cpu"
    trace: Path | None = None  # write a Chrome trace of tandem's steps here

    def validate(self) -> None:
        """Raise ValueError naming the option that is wrong."""
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes: every batch size must be >= 1, got {list(self.batch_sizes)}")
        for name in ("prompt_len", "gen_len", "context_len", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.prompt_len + self.gen_len > self.context_len:
            raise ValueError(
                f"--context-len {self.context_len} cannot hold --prompt-len {self.prompt_len} + "
                f"--gen-len {self.gen_len} tokens"
            )
        modes = self.resolved_modes()
        unknown = [m for m in modes if m not in MODES]
        if unknown or not modes or len(set(modes)) != len(modes):
            raise ValueError(f"--modes: {','.join(modes)!r} is not a list of distinct {', '.join(MODES)}")
        if "llama.cpp" in modes and self.llama_server is None:
            raise ValueError("--modes llama.cpp needs --llama-server PATH (a llama-server binary)")
        if self.llama_server is not None:
            from tandem.bench.llamacpp import check_binary

            try:
                check_binary(self.llama_server)
            except BenchError as e:
                raise ValueError(str(e)) from None
        if self.trace is not None and not any(m in TANDEM_MODES for m in modes):
            raise ValueError("--trace records tandem's steps: it needs overlap or sync in --modes")
        if self.model is not None and self.synthetic is not None:
            raise ValueError("--model and --synthetic exclude each other: one model per race")
        if self.synthetic is not None:
            from tandem.formats.synthetic import synthetic_shape

            shape = synthetic_shape(self.synthetic)
            if not shape.cpu_ok and not self.device.startswith("cuda"):
                raise ValueError(
                    f"--synthetic {shape.name} is a GPU machine's shape ({shape.parameters / 1e9:.1f} B "
                    f"parameters, {shape.file_bytes / 2**30:.1f} GiB file): use it with --device cuda"
                )

    def resolved_modes(self) -> tuple[str, ...]:
        return self.modes if self.modes is not None else default_modes(self.llama_server)


@functools.cache
def _have_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        log.warning("transformers is not installed: the race runs without the hf mode")
        return False
    return True


def default_modes(llama_server: Path | None) -> tuple[str, ...]:
    """sync and overlap; hf when transformers is installed; llama.cpp when a binary is given."""
    modes = ["sync", "overlap"]
    if _have_transformers():
        modes.append("hf")
    if llama_server is not None:
        modes.append("llama.cpp")
    return tuple(modes)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def race_machine(device: str) -> dict[str, Any]:
    from tandem.bench.suite import machine_info

    info = machine_info()
    info["cpu_model"] = cpu_model()
    info["cores"] = os.cpu_count()
    info["device"] = device
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def make_prompts(tokenizer: Any, run_id: int, batch: int, prompt_len: int) -> list[list[int]]:
    """`batch` prompts of exactly `prompt_len` token ids, each starting with its own run and index."""
    filler = tokenizer.encode(_TEXT, add_bos=False)
    if not filler:
        raise BenchError("the model's tokenizer encodes the prompt text to no tokens")
    out = []
    for i in range(batch):
        ids = tokenizer.encode(f"[{run_id}.{i}] {_TEXT}")
        while len(ids) < prompt_len:
            ids += filler
        out.append(ids[:prompt_len])
    return out


@dataclass
class _Model:
    path: Path
    info: dict[str, Any]
    config: Any
    tokenizer: Any


def _model(opts: RaceOptions, workdir: Path, say: Callable[[str], None]) -> _Model:
    from tandem.tokenizer.model_files import read_config_and_tokenizer

    if opts.synthetic is not None:
        from tandem.formats.synthetic import synthetic_shape, write_synthetic_gguf

        shape = synthetic_shape(opts.synthetic)
        say(f"race: writing a random-weight {shape.name} GGUF (about {shape.file_bytes / 2**20:.1f} MiB)")
        path = write_synthetic_gguf(workdir / f"synthetic-{shape.name}.gguf", shape)
        info: dict[str, Any] = {"name": f"synthetic:{shape.name}", "path": None, "synthetic": asdict(shape)}
    else:
        from tandem.store.model_store import ensure_model

        ref = ensure_model(opts.model or DEFAULT_MODEL)
        path = Path(ref.path)
        info = {"name": ref.name, "path": str(path), "synthetic": None}
    if path.suffix != ".gguf":
        raise BenchError(
            f"--model {info['name']}: the race needs a GGUF file (llama-server and hf load it), got {path}"
        )
    config, tokenizer = read_config_and_tokenizer(path)
    info.update(
        file_bytes=path.stat().st_size,
        architecture=config.architecture,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        context_length=config.context_length,
    )
    if opts.context_len > config.context_length:
        raise BenchError(
            f"--context-len {opts.context_len} is longer than the model's {config.context_length}"
        )
    return _Model(path, info, config, tokenizer)


@dataclass
class _Settings:
    threads: int
    baseline_threads: int
    kv_cache_bytes: int


def _settings(opts: RaceOptions, model: _Model) -> _Settings:
    from tandem.bench.suite import engine_worker_threads
    from tandem.bench.tandem_mode import kv_cache_bytes

    c = model.config
    per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # K and V, float32 at most
    threads = engine_worker_threads(opts.threads)
    return _Settings(
        threads=threads,
        baseline_threads=opts.baseline_threads or threads,
        kv_cache_bytes=kv_cache_bytes(per_token, max(opts.batch_sizes), opts.prompt_len + opts.gen_len),
    )


def _build_modes(opts: RaceOptions, model: _Model, s: _Settings, workdir: Path) -> list[Mode]:
    from tandem.bench.hf_mode import HfMode
    from tandem.bench.llamacpp import LlamaCppMode
    from tandem.bench.tandem_mode import TandemServeMode

    modes: list[Mode] = []
    for name in opts.resolved_modes():
        if name in TANDEM_MODES:
            modes.append(
                TandemServeMode(
                    name,
                    model.path,
                    workdir,
                    overlap=name == "overlap",
                    threads=opts.threads,
                    device=opts.device,
                    context_len=opts.context_len,
                    max_batch=max(opts.batch_sizes),
                    kv_bytes=s.kv_cache_bytes,
                )
            )
        elif name == "hf":
            modes.append(HfMode(model.path, threads=s.baseline_threads, device=opts.device))
        else:
            assert opts.llama_server is not None
            modes.append(
                LlamaCppMode(
                    opts.llama_server,
                    model.path,
                    workdir,
                    threads=s.baseline_threads,
                    context_len=opts.context_len,
                )
            )
    return modes


@contextlib.contextmanager
def _started(modes: list[Mode], say: Callable[[str], None]) -> Iterator[list[Mode]]:
    """Every mode started (the servers boot side by side), and every one closed at the end."""
    with contextlib.ExitStack() as stack:
        for m in modes:
            stack.callback(m.close)
            m.start()
        for m in modes:
            m.wait_ready()
            say(f"race: {m.name} ready")
        yield modes


def _race(
    opts: RaceOptions, modes: list[Mode], tokenizer: Any, say: Callable[[str], None]
) -> dict[tuple[str, int], list[RunSample]]:
    samples: dict[tuple[str, int], list[RunSample]] = {}
    run_id = 0
    for batch in opts.batch_sizes:
        for m in modes:
            m.prepare(batch)
        for rep in range(opts.repeats + 1):  # rep 0 warms every mode up and is not counted
            for m in modes:
                run_id += 1
                prompts = make_prompts(tokenizer, run_id, batch, opts.prompt_len)
                sample = m.run(prompts, opts.gen_len, keep_trace=rep > 0)
                tag = "warm-up" if rep == 0 else f"repeat {rep}"
                say(f"race: batch {batch} {m.name} {tag}: {sample.tokens_per_s:.1f} tok/s")
                if rep:
                    samples.setdefault((m.name, batch), []).append(sample)
    return samples


def tandem_mode_of(modes: tuple[str, ...] | list[str]) -> str | None:
    """The mode that stands for tandem in the ratios: its default (overlap), else sync."""
    return next((m for m in TANDEM_MODES if m in modes), None)


def ratios(runs: list[dict[str, Any]], batch_sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per batch size, tokens/s of tandem over llama.cpp and hf, and overlap over sync."""
    tps = {(r["mode"], r["batch_size"]): r["tokens_per_s"] for r in runs}
    tandem = tandem_mode_of([r["mode"] for r in runs])
    out = []
    for b in batch_sizes:
        row: dict[str, Any] = {"batch_size": b}
        for label, num, den in (
            ("tandem/llama.cpp", tandem, "llama.cpp"),
            ("tandem/hf", tandem, "hf"),
            ("overlap/sync", "overlap", "sync"),
        ):
            a, d = tps.get((num, b)) if num else None, tps.get((den, b))
            row[label] = ratio(a, d) if a is not None and d is not None else None
        out.append(row)
    return out


def run_race(opts: RaceOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole race; returns the JSON document (machine, model, settings, runs, ratios)."""
    say = progress or log.info
    opts.validate()
    doc: dict[str, Any] = {"machine": race_machine(opts.device)}
    with tempfile.TemporaryDirectory(prefix="tandem-race-") as tmp:
        workdir = Path(tmp)
        model = _model(opts, workdir, say)
        s = _settings(opts, model)
        doc["model"] = model.info
        doc["settings"] = {
            "modes": list(opts.resolved_modes()),
            "batch_sizes": list(opts.batch_sizes),
            "prompt_len": opts.prompt_len,
            "gen_len": opts.gen_len,
            "context_len": opts.context_len,
            "repeats": opts.repeats,
            "device": opts.device,
            "tandem_worker_threads": s.threads,
            "baseline_threads": s.baseline_threads,
            "tandem_kv_cache_bytes": s.kv_cache_bytes,
            "llama_server": str(opts.llama_server) if opts.llama_server else None,
        }
        modes = _build_modes(opts, model, s, workdir)
        with _started(modes, say):
            samples = _race(opts, modes, model.tokenizer, say)
            doc["settings"]["mode_details"] = {m.name: m.describe() for m in modes}
            if opts.trace is not None:
                _write_trace(opts.trace, modes)
    doc["runs"] = [
        summarize_runs(m, b, samples[(m, b)]) for b in opts.batch_sizes for m in opts.resolved_modes()
    ]
    doc["ratios"] = ratios(doc["runs"], opts.batch_sizes)
    doc["load_avg_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return doc


def _write_trace(path: Path, modes: list[Mode]) -> None:
    import json

    from tandem.bench.tandem_mode import TandemServeMode
    from tandem.bench.trace import chrome_trace

    traced = [m.traced() for m in modes if isinstance(m, TandemServeMode)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(traced)) + "\n")
