"""Sampler tests, CPU only (one CUDA parity check when a GPU is present).

python -m pytest tests/gpu_worker/test_sampler.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.gpu_worker.sampler import (
    SamplingTensors,
    apply_penalties,
    apply_top_k_top_p_min_p,
    sample,
    uniform_noise,
)

NEG_INF = float("-inf")
# Chi-square critical values at p = 0.001, by degrees of freedom.
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47}
N_DRAWS = 20_000
LOGITS5 = [2.0, 1.0, 0.5, 0.0, -1.0]


def params(n: int, **kw) -> SamplingTensors:
    kw.setdefault("seed", list(range(n)))
    return SamplingTensors.from_lists(**kw)


def rand_logits(b: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# ---- greedy and degenerate filters ---------------------------------------------------------------


def test_greedy_equals_argmax():
    logits = rand_logits(16, 300)
    out = sample(logits, params(16))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_greedy_takes_argmax_of_penalized_logits():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0], [5.0, 4.0, 3.0, 0.0]])
    output = torch.tensor([[0, 0, -1], [0, 0, 1]])
    p = params(2, presence_penalty=[1.5, 0.0], frequency_penalty=[0.0, 1.2])
    out = sample(logits, p, output_token_ids=output)
    # row 0: 5 - 1.5 = 3.5 < 4 -> token 1; row 1: 5 - 2.4 = 2.6, 4 - 1.2 = 2.8 < 3 -> token 2
    assert out.token_ids.tolist() == [1, 2]
    expected = apply_penalties(logits, p, None, output).argmax(-1)
    assert torch.equal(out.token_ids, expected)


def test_top_k_1_equals_greedy():
    logits = rand_logits(64, 500, seed=1)
    out = sample(logits, params(64, temperature=[1.5] * 64, top_k=[1] * 64))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_tiny_top_p_equals_greedy():
    logits = rand_logits(64, 500, seed=2)
    out = sample(logits, params(64, temperature=[2.0] * 64, top_p=[1e-6] * 64))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_min_p_masks_below_fraction_of_top_prob():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    p = params(1, temperature=[1.0], min_p=[0.2])  # threshold 0.2 * 0.5 = 0.1
    masked = apply_top_k_top_p_min_p(probs.log(), p)
    assert torch.isinf(masked[0, 3]) and torch.isfinite(masked[0, :3]).all()
    assert torch.allclose(masked[0, :3], probs[0, :3].log())
    drawn = sample(probs.log().expand(2000, 4), params(2000, temperature=[1.0] * 2000, min_p=[0.2] * 2000))
    assert set(drawn.token_ids.tolist()) == {0, 1, 2}


def test_filters_compose_per_row():
    logits = torch.tensor([LOGITS5] * 3)
    p = params(3, temperature=[1.0] * 3, top_k=[2, 0, 4], top_p=[1.0, 0.5, 1.0], min_p=[0.0, 0.0, 0.3])
    kept = torch.isfinite(apply_top_k_top_p_min_p(logits, p)).tolist()
    # top-k 2 | top-p 0.5 (p0 = 0.55 alone covers it) | min-p 0.3 of p0 keeps tokens >= log(0.3) below top
    assert kept == [[True, True, False, False, False], [True, False, False, False, False],
                    [True, True, False, False, False]]  # fmt: skip


# ---- distribution: the Gumbel draw is an exact categorical draw ----------------------------------


def reference_probs(logits: list[float], t: float, top_k: int, top_p: float) -> list[float]:
    """Independent reference: softmax(logits / t), keep top-k, then the smallest head with mass >= p."""
    z = [math.exp(x / t) for x in logits]
    probs = [x / sum(z) for x in z]
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for rank, i in enumerate(order):
        if (top_k > 0 and rank >= top_k) or mass >= top_p:
            break
        kept.append(i)
        mass += probs[i]
    total = sum(probs[i] for i in kept)
    return [probs[i] / total if i in kept else 0.0 for i in range(len(probs))]


def chi_square(counts: list[int], expected: list[float]) -> tuple[float, int]:
    n = sum(counts)
    stat = sum((c - n * e) ** 2 / (n * e) for c, e in zip(counts, expected, strict=True) if e > 0)
    return stat, sum(e > 0 for e in expected) - 1


def draw_counts(t: float, top_k: int, top_p: float, vary: str = "seed") -> list[int]:
    logits = torch.tensor([LOGITS5]).expand(N_DRAWS, 5)
    ids = list(range(N_DRAWS))
    seed, step = (ids, [0] * N_DRAWS) if vary == "seed" else ([42] * N_DRAWS, ids)
    p = SamplingTensors.from_lists(
        seed=seed, step=step, temperature=[t] * N_DRAWS, top_k=[top_k] * N_DRAWS, top_p=[top_p] * N_DRAWS
    )
    return torch.bincount(sample(logits, p).token_ids, minlength=5).tolist()


@pytest.mark.parametrize(
    ("t", "top_k", "top_p", "vary"),
    [(1.0, 0, 1.0, "seed"), (1.0, 0, 1.0, "step"), (0.5, 0, 1.0, "seed"), (2.0, 3, 1.0, "seed"),
     (1.0, 0, 0.8, "seed"), (1.3, 4, 0.9, "step")],
)  # fmt: skip
def test_empirical_frequencies_match_filtered_softmax(t, top_k, top_p, vary):
    counts = draw_counts(t, top_k, top_p, vary)
    expected = reference_probs(LOGITS5, t, top_k, top_p)
    assert all(c == 0 for c, e in zip(counts, expected, strict=True) if e == 0), counts
    stat, df = chi_square(counts, expected)
    assert stat < CHI2_CRIT[df], (counts, [round(e * N_DRAWS) for e in expected])


def test_chi_square_check_has_power():
    # Draws at T=1 must be rejected as draws of T=0.7: the distribution test above can actually fail.
    stat, df = chi_square(draw_counts(1.0, 0, 1.0), reference_probs(LOGITS5, 0.7, 0, 1.0))
    assert stat > CHI2_CRIT[df]


# ---- seeds ---------------------------------------------------------------------------------------


def test_same_seed_and_step_reproduce_regardless_of_batch():
    logits = rand_logits(1, 1000, seed=3).expand(6, 1000)
    seeds, steps = [11, 12, 13, 11, 2**63 - 1, -5], [0, 0, 0, 1, 9, 4]
    base = sample(logits, SamplingTensors.from_lists(seed=seeds, step=steps, temperature=[1.0] * 6)).token_ids
    perm = [4, 2, 5, 0, 3, 1]
    permuted = sample(
        logits,
        SamplingTensors.from_lists(seed=[seeds[i] for i in perm], step=[steps[i] for i in perm],
                                   temperature=[1.0] * 6),
    ).token_ids  # fmt: skip
    assert permuted.tolist() == [base[i].item() for i in perm]
    # Same rows again, surrounded by rows with other logits and knobs, plus a greedy one.
    other = rand_logits(3, 1000, seed=4)
    bigger = torch.cat([other[:2], logits, other[2:]])
    p = SamplingTensors.from_lists(
        seed=[7, 8, *seeds, 9], step=[3, 0, *steps, 1], temperature=[0.5, 0.0, *[1.0] * 6, 2.0],
        top_k=[5, 0, *[0] * 6, 50], presence_penalty=[1.0, 0.0, *[0.0] * 6, 0.5],
    )  # fmt: skip
    assert torch.equal(sample(bigger, p).token_ids[2:8], base)


def test_steps_and_seeds_give_different_draws():
    logits = torch.zeros(32, 1000)
    by_step = sample(
        logits, SamplingTensors.from_lists(seed=[5] * 32, step=list(range(32)), temperature=[1.0] * 32)
    )
    by_seed = sample(logits, SamplingTensors.from_lists(seed=list(range(32)), temperature=[1.0] * 32))
    assert len(set(by_step.token_ids.tolist())) > 25
    assert len(set(by_seed.token_ids.tolist())) > 25


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def reference_noise(seed: int, step: int, v: int) -> float:
    """The hash in plain Python ints: pins the stream, so seeded outputs survive refactors."""
    s, n = seed & (2**64 - 1), step & (2**64 - 1)
    words = (s & 0xFFFFFFFF, s >> 32, n & 0xFFFFFFFF, n >> 32)
    keys = []
    for salt in (0x243F6A88, 0x85A308D3):
        h = salt
        for w in words:
            h = _fmix32(((h ^ w) + 0x9E3779B9) & 0xFFFFFFFF)
        keys.append(h)
    x = _fmix32(_fmix32(((v * 0x9E3779B1) & 0xFFFFFFFF) ^ keys[0]) ^ keys[1])
    return ((x >> 9) + 0.5) / 2**23


def test_noise_is_bit_exact_with_python_reference():
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 123456789012345, -987654321]
    steps = [0, 1, 2**40 + 3, 7, 0, 99, 2**62]
    got = uniform_noise(torch.tensor(seeds), torch.tensor(steps), 300)
    want = [[reference_noise(s, n, v) for v in range(300)] for s, n in zip(seeds, steps, strict=True)]
    assert got.tolist() == want
    assert 0.0 < got.min() and got.max() < 1.0


def test_builder_defaults_and_unsigned_seeds():
    a = SamplingTensors.from_lists(seed=[2**64 - 1, 2**63], top_k=[5, 0]).to("cpu")
    assert a.seed.tolist() == [-1, -(2**63)]  # same bits, so the same stream as the unsigned seed
    assert a.batch_size == 2 and a.top_k.dtype == torch.int32 and a.top_k.tolist() == [5, 0]
    assert a.temperature.tolist() == [0.0, 0.0] and a.top_p.tolist() == [1.0, 1.0]
    assert a.num_logprobs.tolist() == [-1, -1] and a.repetition_penalty.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        SamplingTensors.from_lists(seed=[1, 2], temperature=[1.0])


# ---- penalties -----------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -0.5]])
    p = params(1, repetition_penalty=[2.0])
    prompt, output = torch.tensor([[0, -1, -1]]), torch.tensor([[1, 1]])
    got = apply_penalties(logits, p, prompt, output)
    assert got.tolist() == [[1.0, -4.0, 1.0, 0.5, -0.5]]
    # Prompt alone counts too; repetition 1.0 is a no-op.
    assert apply_penalties(logits, p, prompt, None).tolist() == [[1.0, -2.0, 1.0, 0.5, -0.5]]
    assert torch.equal(apply_penalties(logits, params(1, repetition_penalty=[1.0]), prompt, output), logits)


def test_presence_and_frequency_penalties_count_output_only():
    logits = torch.zeros(2, 5)
    p = params(2, presence_penalty=[1.0, 0.0], frequency_penalty=[0.5, 0.25])
    prompt = torch.tensor([[4, 4, 4], [4, -1, -1]])
    output = torch.tensor([[2, 2, 3, -1], [1, 1, 1, 0]])
    got = apply_penalties(logits, p, prompt, output)
    assert got.tolist() == [[0.0, 0.0, -2.0, -1.5, 0.0], [-0.25, -0.75, 0.0, 0.0, 0.0]]


# ---- logprobs ------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_at_sampled_id():
    logits = rand_logits(4, 200, seed=5)
    p = params(4, temperature=[0.0, 0.7, 1.0, 3.0], top_k=[0, 10, 0, 3], repetition_penalty=[1.3] * 4,
               presence_penalty=[0.5] * 4, num_logprobs=[-1, 0, 2, 5])  # fmt: skip
    out = sample(logits, p, prompt_token_ids=torch.arange(8).expand(4, 8), max_top_logprobs=5)
    ref = logits.log_softmax(-1)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids[:, None]).squeeze(1))
    top_lp, top_ids = ref.topk(5)
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids[:2].eq(-1).all() and out.top_logprobs[:2].eq(NEG_INF).all()
    assert torch.equal(out.top_ids[2, :2], top_ids[2, :2]) and out.top_ids[2, 2:].eq(-1).all()
    assert torch.equal(out.top_ids[3], top_ids[3])
    assert torch.allclose(out.top_logprobs[3], top_lp[3])
    assert (out.top_logprobs[3].diff() <= 0).all()


def test_no_top_logprobs_unless_asked():
    out = sample(rand_logits(2, 50), params(2, num_logprobs=[3, 3]))
    assert out.top_ids is None and out.top_logprobs is None


def test_half_precision_logits_are_accepted():
    logits = rand_logits(3, 100, seed=6)
    out = sample(logits.to(torch.bfloat16), params(3, num_logprobs=[1] * 3), max_top_logprobs=1)
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.token_ids, logits.to(torch.bfloat16).float().argmax(-1))


# ---- properties ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    v=st.integers(2, 64),
    top_k=st.integers(-1, 70),
    top_p=st.floats(0.0, 1.0),
    t=st.floats(0.05, 5.0),
    seed=st.integers(-(2**63), 2**63 - 1),
    data_seed=st.integers(0, 1000),
)
def test_sampled_token_is_always_inside_the_top_k_set(v, top_k, top_p, t, seed, data_seed):
    logits = rand_logits(1, v, seed=data_seed)
    p = SamplingTensors.from_lists(seed=[seed], temperature=[t], top_k=[top_k], top_p=[top_p])
    tok = sample(logits, p).token_ids.item()
    rank = int((logits[0] > logits[0, tok]).sum())
    assert rank < (top_k if top_k > 0 else v)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    logits = rand_logits(64, 49152, seed=7)
    p = params(64, temperature=[0.8] * 64, top_k=[50] * 64, top_p=[0.95] * 64, step=list(range(64)))
    cpu = sample(logits, p)
    gpu = sample(logits.cuda(), p.to("cuda"))
    noise = uniform_noise(p.seed.cuda(), p.step.cuda(), 1000).cpu()
    assert torch.equal(uniform_noise(p.seed, p.step, 1000), noise)
    assert torch.equal(cpu.token_ids, gpu.token_ids.cpu())
