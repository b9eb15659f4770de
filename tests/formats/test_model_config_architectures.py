"""Config of the architectures beyond llama: which layers slide, their rope bases, scales."""

from __future__ import annotations

import pytest

from tandem.errors import ModelFileError, UnsupportedModelError
from tandem.formats.model_config import config_from_gguf, config_from_hf

GEMMA3_GGUF = {
    "general.architecture": "gemma3",
    "gemma3.block_count": 12,
    "gemma3.embedding_length": 640,
    "gemma3.feed_forward_length": 2048,
    "gemma3.attention.head_count": 4,
    "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.key_length": 256,
    "gemma3.vocab_size": 1000,
    "gemma3.attention.sliding_window": 512,
}
TENSORS = {"token_embd.weight", "output_norm.weight", "blk.0.attn_q_norm.weight"}


def test_gemma3_gguf_without_a_pattern_has_every_sixth_layer_global() -> None:
    c = config_from_gguf(GEMMA3_GGUF, TENSORS, "f.gguf")
    assert [i for i in range(12) if not c.is_sliding(i)] == [5, 11]
    assert c.sliding_window == 512 and c.rope_local_theta == 10000.0 and c.qk_norm
    assert c.attention_scale == 256**-0.5 and c.final_logit_softcap is None


def test_gguf_pattern_as_flags_and_a_bad_one() -> None:
    flags = [i % 2 == 0 for i in range(12)]
    c = config_from_gguf({**GEMMA3_GGUF, "gemma3.attention.sliding_window_pattern": flags}, TENSORS, "f")
    assert c.sliding_layers == tuple(flags)
    with pytest.raises(ModelFileError, match="sliding_window_pattern"):
        config_from_gguf({**GEMMA3_GGUF, "gemma3.attention.sliding_window_pattern": [True]}, TENSORS, "f")


HF_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=100
)


def test_qwen_slides_only_with_use_sliding_window() -> None:
    cfg = {**HF_COMMON, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32768}
    assert config_from_hf(cfg, "d").sliding_window is None
    on = config_from_hf({**cfg, "use_sliding_window": True, "max_window_layers": 2}, "d")
    assert on.sliding_window == 32768 and on.sliding_layers == (False, False, True, True)


def test_mistral_slides_every_layer_and_gemma3_follows_its_pattern() -> None:
    m = config_from_hf({**HF_COMMON, "architectures": ["MistralForCausalLM"], "sliding_window": 16}, "d")
    assert m.architecture == "llama" and m.sliding_layers == (True,) * 4 and not m.qk_norm
    gemma = {**HF_COMMON, "architectures": ["Gemma3ForCausalLM"], "sliding_window": 8}
    g = config_from_hf({**gemma, "sliding_window_pattern": 2}, "d")
    assert g.sliding_layers == (True, False, True, False) and g.query_pre_attn_scalar == 256


def test_gemma3_features_not_implemented_are_refused() -> None:
    base = {**HF_COMMON, "architectures": ["Gemma3ForCausalLM"]}
    with pytest.raises(UnsupportedModelError, match="soft-capping"):
        config_from_hf({**base, "attn_logit_softcapping": 50.0}, "d")
    with pytest.raises(UnsupportedModelError, match="activation"):
        config_from_hf({**base, "hidden_activation": "relu"}, "d")
