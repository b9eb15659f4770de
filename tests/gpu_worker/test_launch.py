"""The worker's launch path on real ring slots: no host reads of device values, and the captured
decode-step body (run eagerly here, as a CUDA graph on a GPU) equals the ordinary launch."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from step_driver import BLOCK, Seq, make_runner, tokens_of, write_step
from torch.utils._python_dispatch import TorchDispatchMode

from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.gpu_worker.cuda_graphs import DecodeGraphs
from tandem.gpu_worker.runner import ModelRunner
from tandem.shm.slot import SlotView

# Ops whose result a host must read (or whose output shape depends on device data): on a GPU
# each of them stalls the launch until the device catches up.
_HOST_READS = {
    "aten._local_scalar_dense.default",  # .item(), int(t), float(t), .tolist()
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten.repeat_interleave.Tensor",
    "aten._unique2.default",
    "aten.unique_consecutive.default",
}


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.Tensor", "aten.index_put")) and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool
            for t in (args[1] if len(args) > 1 else [])
            if t is not None
        )
        if name in _HOST_READS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("m") / "t.gguf", TinySpec(seed=4))


@pytest.fixture
def runner_pair(model_path: Path) -> Iterator[tuple[ModelRunner, ModelRunner, SlotView]]:
    """Two runners on the same weights, and a slot of a real ring to pack steps into."""
    (a, ring), (b, other) = make_runner(model_path), make_runner(model_path)
    other.unlink()
    yield a, b, ring.slot(0)
    ring.unlink()


def _seqs() -> list[Seq]:
    # Blocks scattered through the pool, a request per sampling flavour.
    return [
        Seq(0, [7, 2, 30], prompt_len=5),
        Seq(1, [11, 4, 25], prompt_len=9, temperature=0.8, top_k=20, seed=3),
        Seq(2, [5, 19, 1], prompt_len=3, repetition_penalty=1.3, frequency_penalty=0.5, num_logprobs=2),
        Seq(3, [9, 14, 40], prompt_len=18),
    ]


def test_launch_reads_no_device_values_on_the_host(runner_pair: tuple) -> None:
    runner, _, slot = runner_pair
    rng = random.Random(0)
    seqs = _seqs()
    prompts = {s.worker_slot: [rng.randrange(200) for _ in range(s.prompt_len)] for s in seqs}
    steps = [
        [(seqs[0], prompts[0]), (seqs[1], prompts[1]), (seqs[2], prompts[2]), (seqs[3], prompts[3][:10])],
        # decodes referring to the previous step's tokens beside the rest of a prompt
        [(seqs[0], [-1]), (seqs[1], [-2]), (seqs[2], [-3]), (seqs[3], prompts[3][10:])],
        [(seqs[0], [-1]), (seqs[1], [-2]), (seqs[2], [-3]), (seqs[3], [-4])],
    ]
    for k, work in enumerate(steps):
        bell = write_step(slot, k, work)
        with HostReads() as mode:
            pending = runner.launch(slot, bell, 0.0)
        assert mode.seen == [], f"step {k}: the launch read device values back: {sorted(set(mode.seen))}"
        assert len(tokens_of(runner, pending)) == sum(s.done >= s.prompt_len for s, _ in work)


def test_decode_graph_body_equals_the_eager_launch(runner_pair: tuple) -> None:
    eager, graphed, slot = runner_pair
    width = -(-graphed.cfg.context_length // BLOCK)
    graphs = DecodeGraphs(graphed, [2, 4, 8], width, paged_kernel=False, capture=False)
    rng = random.Random(1)
    for greedy in (True, False):
        # 3 sequences: one padded row in bucket 4, the padding writing to the scratch slot.
        seqs = {
            r: [
                Seq(0, [3, 12], prompt_len=6, temperature=0.0 if greedy else 0.9, seed=1),
                Seq(1, [8, 1], prompt_len=11, temperature=0.0 if greedy else 0.7, seed=2),
                Seq(2, [20, 6], prompt_len=2, temperature=0.0 if greedy else 1.1, seed=3),
            ]
            for r in ("eager", "graphed")
        }
        prompts = [[rng.randrange(200) for _ in range(s.prompt_len)] for s in seqs["eager"]]
        for r, runner in (("eager", eager), ("graphed", graphed)):
            bell = write_step(slot, 0, list(zip(seqs[r], prompts, strict=True)))
            tokens_of(runner, runner.launch(slot, bell, 0.0))
        for step in range(1, 20):  # crosses a block edge for every sequence
            refs = [[-1 - i] for i in range(3)]
            bell = write_step(slot, step, list(zip(seqs["eager"], refs, strict=True)))
            want = tokens_of(eager, eager.launch(slot, bell, 0.0))
            bell = write_step(slot, step, list(zip(seqs["graphed"], refs, strict=True)))
            a = slot.prefixes(bell.num_tokens, bell.num_seqs)
            launched = graphs.try_launch(a, bell)
            assert launched is not None, "a plain decode step must take the graph path"
            assert launched[0].tolist() == want, f"step {step}, greedy={greedy}"
            assert (launched[1] is None) == greedy
    owned = sorted({b for s in seqs["graphed"] for b in s.blocks})
    for layer_e, layer_g in zip(eager.kv.layers, graphed.kv.layers, strict=True):
        e = layer_e.view(2, -1, eager.kv.num_blocks + 1, BLOCK, layer_e.shape[-1])
        g = layer_g.view(2, -1, graphed.kv.num_blocks + 1, BLOCK, layer_g.shape[-1])
        assert torch.allclose(e[:, :, owned], g[:, :, owned], atol=1e-5)
        # Padding went to the scratch block only: every other unowned block is still zero.
        others = [b for b in range(graphed.kv.num_blocks) if b not in owned]
        assert not g[:, :, others].any()
        assert g[:, :, graphed.kv.scratch_block].any()


def test_graphs_skip_steps_they_cannot_run(runner_pair: tuple) -> None:
    runner, _, slot = runner_pair
    graphs = DecodeGraphs(runner, [2, 4], -(-runner.cfg.context_length // BLOCK), False, capture=False)
    s = Seq(0, [1, 2], prompt_len=4)
    bell = write_step(slot, 0, [(s, [5, 6, 7, 8])])
    assert graphs.try_launch(slot.prefixes(bell.num_tokens, bell.num_seqs), bell) is None  # prefill
    p = Seq(1, [3, 4], prompt_len=1, repetition_penalty=1.2)
    bell = write_step(slot, 1, [(p, [9])])
    assert graphs.try_launch(slot.prefixes(bell.num_tokens, bell.num_seqs), bell) is None  # penalties
    many = [Seq(i, [10 + i], prompt_len=1) for i in range(5)]
    bell = write_step(slot, 2, [(x, [1]) for x in many])
    assert graphs.try_launch(slot.prefixes(bell.num_tokens, bell.num_seqs), bell) is None  # > largest
