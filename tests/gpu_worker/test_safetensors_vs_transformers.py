"""Hugging Face safetensors folders load into the same model class and match transformers' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tandem.formats.loader import load_model_weights
from tandem.gpu_worker.kv_cache import KVCache
from tandem.gpu_worker.model.attention import AttentionMetadata
from tandem.gpu_worker.model.llama import LlamaModel

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
CASES = {
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=10000.0)),
    "llama3-rope-scaling": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_safetensors_folder_matches_transformers(tmp_path: Path, case: str) -> None:
    cfg_cls, model_cls, extra = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path, safe_serialization=True)

    loaded = load_model_weights(tmp_path)
    assert loaded.config.architecture == ("qwen2" if "qwen2" in case else "llama")
    assert loaded.config.attention_bias == ("qwen2" in case)
    assert (loaded.config.rope_scaling is not None) == ("rope-scaling" in case)
    model = LlamaModel(loaded.config, loaded.tensors)

    ids = list(range(5, 105))  # past original_max_position_embeddings so scaling matters
    kv = KVCache.allocate(loaded.config, 8, 16, torch.float32)
    pos = torch.arange(len(ids))
    meta = AttentionMetadata.build(pos, [len(ids)], [len(ids)], torch.arange(8, dtype=torch.int32)[None], 16)
    got = model(torch.tensor(ids), pos, kv, meta, torch.arange(len(ids)))
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"relative error {err:.2e}"
