"""Batched token sampling on the device: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Everything is tensor ops with static shapes and no host syncs, so one code path serves CPU and CUDA and can
be captured in a CUDA graph. Randomness is a counter-based hash of (seed, step, token id) instead of a torch
generator: a row's draw depends on its own request only, never on which rows share the batch, their order,
or how many draws other requests took before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_NEG_INF = float("-inf")


@dataclass
class SamplingTensors:
    """One row per sequence in the batch, all on the logits' device."""

    temperature: Tensor  # float32 (B,), <= 0 => greedy
    top_k: Tensor  # int32 (B,), <= 0 => disabled
    top_p: Tensor  # float32 (B,), >= 1.0 => disabled
    min_p: Tensor  # float32 (B,), 0.0 => disabled
    repetition_penalty: Tensor  # float32 (B,), 1.0 => disabled; over prompt + output tokens
    presence_penalty: Tensor  # float32 (B,), over output tokens
    frequency_penalty: Tensor  # float32 (B,), over output tokens
    seed: Tensor  # int64 (B,)
    step: Tensor  # int64 (B,), index of the token being sampled within the request's output
    num_logprobs: Tensor  # int32 (B,), -1 => none; 0 => sampled token only; n => also top-n

    @property
    def batch_size(self) -> int:
        return self.temperature.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SamplingTensors:
        return SamplingTensors(
            **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        )

    @classmethod
    def from_lists(
        cls,
        *,
        seed: Sequence[int],
        step: Sequence[int] | None = None,
        temperature: Sequence[float] | None = None,
        top_k: Sequence[int] | None = None,
        top_p: Sequence[float] | None = None,
        min_p: Sequence[float] | None = None,
        repetition_penalty: Sequence[float] | None = None,
        presence_penalty: Sequence[float] | None = None,
        frequency_penalty: Sequence[float] | None = None,
        num_logprobs: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> SamplingTensors:
        """Build from per-row host values; an omitted field means "disabled" (temperature: greedy)."""
        n = len(seed)

        def col(values: Sequence[float] | None, default: float, dtype: torch.dtype) -> Tensor:
            if values is None:
                return torch.full((n,), default, dtype=dtype, device=device)
            if len(values) != n:
                raise ValueError(f"expected {n} values, got {len(values)}")
            return torch.as_tensor(values, dtype=dtype, device=device)

        # Seeds may arrive as unsigned 64-bit values; keep their bits, reinterpreted as int64.
        seeds = [int(s) & 0xFFFFFFFFFFFFFFFF for s in seed]
        seeds = [s - (1 << 64) if s >= (1 << 63) else s for s in seeds]
        return cls(
            temperature=col(temperature, 0.0, torch.float32),
            top_k=col(top_k, 0, torch.int32),
            top_p=col(top_p, 1.0, torch.float32),
            min_p=col(min_p, 0.0, torch.float32),
            repetition_penalty=col(repetition_penalty, 1.0, torch.float32),
            presence_penalty=col(presence_penalty, 0.0, torch.float32),
            frequency_penalty=col(frequency_penalty, 0.0, torch.float32),
            seed=torch.as_tensor(seeds, dtype=torch.int64, device=device),
            step=col(step, 0, torch.int64),
            num_logprobs=col(num_logprobs, -1, torch.int32),
        )


@dataclass
class SampleOutput:
    token_ids: Tensor  # int64 (B,)
    logprobs: Tensor  # float32 (B,), log-softmax of the raw logits (pre-penalty, temperature 1) at token_ids
    top_ids: Tensor | None  # int64 (B, K); -1 past a row's requested n (and everywhere for n <= 0)
    top_logprobs: Tensor | None  # float32 (B, K), descending; -inf where top_ids is -1


# ---- counter-based random numbers ------------------------------------------------------------------
# 32-bit lanes held in int64: values stay in [0, 2**32), so >> is a logical shift, and _mul32 keeps every
# product below 2**49, so nothing relies on signed-overflow wrapping (undefined in C++, whatever torch does).


def _mul32(x: Tensor, c: int) -> Tensor:
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _fmix32(h: Tensor) -> Tensor:
    # MurmurHash3's finalizer: a bijection on 32 bits with full avalanche.
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _row_key(seed: Tensor, step: Tensor, salt: int) -> Tensor:
    h = torch.full_like(seed, salt)
    for word in (seed & _M32, (seed >> 32) & _M32, step & _M32, (step >> 32) & _M32):
        h = _fmix32(((h ^ word) + 0x9E3779B9) & _M32)
    return h


def uniform_noise(seed: Tensor, step: Tensor, vocab_size: int) -> Tensor:
    """(B, V) float32 uniforms in (0, 1), a pure function of (seed[b], step[b], v)."""
    # Two independent 32-bit row keys, so distinct (seed, step) pairs collide with odds ~2**-64, not 2**-32.
    k1 = _row_key(seed, step, 0x243F6A88)[:, None]
    k2 = _row_key(seed, step, 0x85A308D3)[:, None]
    v = torch.arange(vocab_size, dtype=torch.int64, device=seed.device)
    x = _fmix32(_mul32(v, 0x9E3779B1)[None, :] ^ k1)
    x = _fmix32(x ^ k2)
    # 23 bits + 0.5 keeps u strictly inside (0, 1) in float32, so -log(-log(u)) is always finite.
    return ((x >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


# ---- the pipeline ----------------------------------------------------------------------------------


def _token_counts(ids: Tensor, vocab_size: int, dtype: torch.dtype) -> Tensor:
    # Padding (-1) is routed to an extra column that is dropped: no data-dependent shapes, no host sync.
    ids = torch.where(ids < 0, vocab_size, ids.to(torch.int64))
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=dtype, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=dtype))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: Tensor, params: SamplingTensors, prompt_token_ids: Tensor | None, output_token_ids: Tensor | None
) -> Tensor:
    """Repetition (HF/llama.cpp) over prompt + output, then frequency and presence (OpenAI) over output."""
    vocab_size = logits.shape[1]
    out_counts = None
    if output_token_ids is not None:
        out_counts = _token_counts(output_token_ids, vocab_size, logits.dtype)
    in_prompt = None
    if prompt_token_ids is not None:
        in_prompt = _token_counts(prompt_token_ids, vocab_size, logits.dtype) > 0
    return apply_penalty_state(logits, params, in_prompt, out_counts)


def apply_penalty_state(
    logits: Tensor, params: SamplingTensors, prompt_mask: Tensor | None, output_counts: Tensor | None
) -> Tensor:
    """Penalties from per-row state the worker keeps on the device: (B, V) prompt presence mask and
    output token counts, so no token history has to travel with each step."""
    seen = None if output_counts is None else output_counts > 0
    if prompt_mask is not None:
        seen = prompt_mask if seen is None else seen | prompt_mask
    if seen is not None:
        rp = params.repetition_penalty[:, None]
        # Dividing a negative logit would raise it; multiplying lowers it, so both move away from the token.
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    if output_counts is not None:
        counts = output_counts.to(logits.dtype)
        logits = (
            logits
            - params.frequency_penalty[:, None] * counts
            - params.presence_penalty[:, None] * (counts > 0).to(logits.dtype)
        )
    return logits


def apply_top_k_top_p_min_p(logits: Tensor, params: SamplingTensors) -> Tensor:
    """Mask to -inf what top-k, then top-p, then min-p drop; the most likely token always survives."""
    vocab_size = logits.shape[1]
    # One sort serves all three filters; stable so ties break by token id on every device.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab_size, device=logits.device)[None, :]
    k = params.top_k.to(torch.int64)[:, None]
    keep = (rank < k) | (k <= 0)
    probs = sorted_logits.masked_fill(~keep, _NEG_INF).softmax(dim=-1)
    # A token stays while the mass strictly above it is below p; ">= 1" is exact "off" despite float cumsum.
    mass_above = probs.cumsum(dim=-1) - probs
    top_p = params.top_p[:, None]
    keep = keep & ((mass_above < top_p) | (top_p >= 1.0))
    # min-p is relative to the top token, so renormalising after top-p would not change the comparison.
    keep = keep & (probs >= params.min_p[:, None] * probs[:, :1])
    keep = keep | (rank == 0)
    masked = sorted_logits.masked_fill(~keep, _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter(1, order, masked)


def sample(
    logits: Tensor,
    params: SamplingTensors,
    prompt_token_ids: Tensor | None = None,
    output_token_ids: Tensor | None = None,
    max_top_logprobs: int = 0,
    penalty_state: tuple[Tensor | None, Tensor | None] | None = None,
) -> SampleOutput:
    """Sample one token per row of `logits` (B, V).

    `prompt_token_ids` / `output_token_ids` are int64 (B, L) padded with -1; None skips the penalties that
    need them; `penalty_state` = (prompt_mask, output_counts) replaces both with state kept on the
    device. `max_top_logprobs` is the host-known K of the top-n outputs (0 => none), passed in so the
    output shape never depends on device data.
    """
    raw = logits.to(torch.float32)
    vocab_size = raw.shape[1]
    if penalty_state is not None:
        penalized = apply_penalty_state(raw, params, *penalty_state)
    else:
        penalized = apply_penalties(raw, params, prompt_token_ids, output_token_ids)
    greedy_ids = penalized.argmax(dim=-1)

    sampling = params.temperature > 0
    temperature = torch.where(sampling, params.temperature, 1.0)[:, None]
    filtered = apply_top_k_top_p_min_p(penalized / temperature, params)
    # Gumbel-max == the exponential race argmax(p / -log u): an exact categorical draw without a cumsum.
    gumbel = -torch.log(-torch.log(uniform_noise(params.seed, params.step, vocab_size)))
    sampled_ids = (filtered + gumbel).argmax(dim=-1)
    token_ids = torch.where(sampling, sampled_ids, greedy_ids)

    # Raw logprobs (vLLM's default): what the model said, not what the sampling knobs made of it.
    all_logprobs = raw.log_softmax(dim=-1)
    logprobs = all_logprobs.gather(1, token_ids[:, None]).squeeze(1)
    top_ids = top_logprobs = None
    k = min(max_top_logprobs, vocab_size)
    if k > 0:
        top_logprobs, top_ids = all_logprobs.topk(k, dim=-1)
        wanted = torch.arange(k, device=raw.device)[None, :] < params.num_logprobs[:, None]
        top_ids = top_ids.masked_fill(~wanted, -1)
        top_logprobs = top_logprobs.masked_fill(~wanted, _NEG_INF)
    return SampleOutput(token_ids=token_ids, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)
