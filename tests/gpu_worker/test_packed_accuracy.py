"""The accuracy gate of --dtype auto (packed GGUF weights, bf16 compute) on the real default model:
perplexity on public-domain prose within 1% of the float32 path's, and greedy continuations that
match float32's first 8 tokens for at least 7 of 8 prompts. Run with -s to see the figures.

The text (tests/data/public_domain_prose.txt) is the Declaration of Independence (1776), the
Gettysburg Address (1863) and Lincoln's Second Inaugural Address (1865), all in the public domain.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata
from tandem.gpu_worker.model.llama import LlamaModel
from tandem.gpu_worker.runner import build_model, paged_kernel_for
from tandem.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

TEXT = Path(__file__).parents[1] / "data" / "public_domain_prose.txt"
PROMPTS = [
    "The three primary colors are",
    "The capital of France is",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The largest planet in the solar system is",
    "def fibonacci(n):",
    "The main ingredients of bread are",
    "Photosynthesis is the process by which",
]
BLOCK = 16
CHUNK = 512  # prefill chunk of the perplexity pass, as the worker's default token budget


@pytest.fixture(scope="module")
def models(default_model_path: Path) -> dict[str, LlamaModel]:
    cpu = torch.device("cpu")
    out = {name: build_model(str(default_model_path), name, cpu) for name in ("float32", "auto")}
    assert out["auto"].has_packed_weights and not out["float32"].has_packed_weights
    return out


def _kv(model: LlamaModel, tokens: int) -> tuple[KVCache, torch.Tensor]:
    blocks = -(-tokens // BLOCK)
    kv = KVCache.allocate(model.config, blocks, BLOCK, model.cache_dtype)
    return kv, torch.arange(blocks, dtype=torch.int32).view(1, -1)


def perplexity(model: LlamaModel, ids: list[int]) -> float:
    """exp(mean NLL of every next token), the text fed in chunks through the paged KV cache."""
    kv, table = _kv(model, len(ids))
    nll = 0.0
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)
        pos = torch.arange(start, end)
        meta = AttentionMetadata.build(pos, [end - start], [end], table, BLOCK)
        logits = model(torch.tensor(ids[start:end]), pos, kv, meta, torch.arange(end - start))
        targets = torch.tensor(ids[start + 1 : end + 1])
        nll -= float(logits.log_softmax(-1).gather(1, targets[:, None]).sum())
    return math.exp(nll / (len(ids) - 1))


def greedy(model: LlamaModel, ids: list[int], n: int) -> list[int]:
    """n greedy tokens: a prefill, then one-token decode steps (the small-M kernels, and the decode
    attention kernel the worker picks for this cache)."""
    kv, table = _kv(model, len(ids) + n)
    kernel = paged_kernel_for(torch.device("cpu"), kv.dtype)
    seq, done, out = list(ids), 0, []
    for _ in range(n):
        pos = torch.arange(done, len(seq))
        meta = AttentionMetadata.build(pos, [len(seq) - done], [len(seq)], table, BLOCK, paged_kernel=kernel)
        logits = model(torch.tensor(seq[done:]), pos, kv, meta, torch.tensor([len(seq) - done - 1]))
        done = len(seq)
        seq.append(int(logits[0].argmax()))
        out.append(seq[-1])
    return out


def test_packed_perplexity_is_within_one_percent(models: dict, default_model_path: Path) -> None:
    ids = Tokenizer.from_gguf(default_model_path).encode(TEXT.read_text())
    assert len(ids) >= 2000
    ppl = {name: perplexity(m, ids) for name, m in models.items()}
    ratio = ppl["auto"] / ppl["float32"]
    print(
        f"\nperplexity over {len(ids)} tokens: float32 {ppl['float32']:.4f}, auto {ppl['auto']:.4f} "
        f"(ratio {ratio:.4f})"
    )
    assert abs(ratio - 1) <= 0.01


def test_packed_greedy_continuations_match_float32(models: dict, default_model_path: Path) -> None:
    tok = Tokenizer.from_gguf(default_model_path)
    matches = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        want, got = greedy(models["float32"], ids, 8), greedy(models["auto"], ids, 8)
        matches += want == got
        print(
            f"\n{prompt!r}: {'match' if want == got else 'differs'}\n  float32 {tok.decode(want)!r}"
            f"\n  auto    {tok.decode(got)!r}"
        )
    print(f"greedy: {matches}/8 prompts match float32 on their first 8 tokens")
    assert matches >= 7
