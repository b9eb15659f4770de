"""On a CUDA GPU: the compiled paged kernel, and two overlapped steps that never sync the host.

Marked `gpu`: skipped (by tests/conftest.py) where CUDA is not available. benchmarks/gpu_check.sh
runs these on a lent GPU machine.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from step_driver import Seq, make_runner, tokens_of, write_step

from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.gpu_worker.runner import ModelRunner, PendingResult
from tandem.messages import Doorbell
from tandem.shm import RingSegment

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "t.gguf", TinySpec(hidden=128, ffn=256, seed=5))


@pytest.fixture
def runners(model_path: Path) -> Iterator[tuple[ModelRunner, ModelRunner, RingSegment]]:
    """A GPU runner with captured decode graphs, a CPU runner as the reference, and a ring."""
    gpu, ring = make_runner(model_path, device="cuda")
    gpu.prepare_launch()
    cpu, other = make_runner(model_path)
    other.unlink()
    yield gpu, cpu, ring
    ring.unlink()


def test_compiled_kernel_matches_sdpa() -> None:
    import triton_cases

    assert triton_cases.run_all("cuda") == len(triton_cases.CASES) + len(triton_cases.GPU_CASES) + 1


def _launch_without_sync(runner: ModelRunner, ring: RingSegment, bell: Doorbell) -> PendingResult:
    torch.cuda.synchronize()  # whatever came before is done: only the launch itself is watched
    torch.cuda.set_sync_debug_mode("error")
    try:
        return runner.launch(ring.slot(bell.slot), bell, 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_two_overlapped_steps_launch_without_host_syncs(
    runners: tuple[ModelRunner, ModelRunner, RingSegment],
) -> None:
    gpu, cpu, ring = runners
    assert gpu._graphs is not None, "decode graphs are captured on a GPU unless --enforce-eager"
    rng = random.Random(2)
    # Row 2 asks for its token's logprob: its steps take the sampling graph, still greedy.
    seqs = {
        r: [
            Seq(i, [3 * i, 3 * i + 1, 3 * i + 2], prompt_len=5 + 7 * i, num_logprobs=0 if i == 2 else -1)
            for i in range(3)
        ]
        for r in "gc"
    }
    prompts = [[rng.randrange(200) for _ in range(s.prompt_len)] for s in seqs["g"]]
    refs = [[-1 - i] for i in range(3)]
    steps = [
        lambda s: list(zip(s, prompts, strict=True)),  # prefill: the eager path
        lambda s: list(zip(s, refs, strict=True)),  # decodes: graph replays
        lambda s: list(zip(s, refs, strict=True)),
        lambda s: list(zip(s, refs, strict=True)),
    ]
    want, got = [], []
    pending = None
    for k, work in enumerate(steps):
        # Step k is launched while step k-1 is still in flight, its tokens referred to, not known.
        bell = write_step(ring.slot(k % 2), k, work(seqs["g"]))
        launched = _launch_without_sync(gpu, ring, bell)
        if pending is not None:
            got.append(tokens_of(gpu, pending))
        pending = launched
        bell = write_step(ring.slot(k % 2), k, work(seqs["c"]))
        want.append(tokens_of(cpu, cpu.launch(ring.slot(k % 2), bell, 0.0)))
    got.append(tokens_of(gpu, pending))
    assert got == want


def test_enforce_eager_captures_nothing(model_path: Path) -> None:
    runner, ring = make_runner(model_path, device="cuda")
    try:
        runner.prepare_launch(enforce_eager=True)
        assert runner._graphs is None
    finally:
        ring.unlink()
