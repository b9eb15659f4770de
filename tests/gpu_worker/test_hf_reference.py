"""Logits of the real default model equal Hugging Face transformers' for the same GGUF file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.formats.loader import load_gguf
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata
from tandem.gpu_worker.model.llama import LlamaModel

pytestmark = pytest.mark.slow

PROMPTS = [
    [
        1,
        9690,
        198,
        2683,
        359,
        253,
        5356,
        5646,
        11173,
        3365,
        3511,
        308,
        34519,
        28,
        7018,
        411,
        407,
        19712,
        8182,
        2,
        198,
        1,
        4093,
        198,
        23464,
        2,
        198,
        1,
        520,
        9531,
        198,
    ],
    [504, 3458, 282, 4649, 314],  # "The capital of France is"
    list(range(100, 164)),
]


@pytest.fixture(scope="module")
def ours(default_model_path: Path) -> LlamaModel:
    m = load_gguf(default_model_path)
    return LlamaModel(m.config, m.tensors)


def _our_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    block = 16
    nblocks = -(-len(ids) // block)
    kv = KVCache.allocate(model.config, nblocks, block, torch.float32)
    pos = torch.arange(len(ids))
    bt = torch.arange(nblocks, dtype=torch.int32).view(1, -1)
    meta = AttentionMetadata.build(pos, [len(ids)], [len(ids)], bt, block)
    return model(torch.tensor(ids), pos, kv, meta, torch.arange(len(ids)))


@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_logits_match_transformers(hf_model, ours: LlamaModel, prompt: int) -> None:
    ids = PROMPTS[prompt]
    with torch.inference_mode():
        expected = hf_model(torch.tensor([ids])).logits[0].float()
    got = _our_logits(ours, ids)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-3, f"relative error {err:.2e}"
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
