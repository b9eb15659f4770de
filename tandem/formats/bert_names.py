"""BERT's tensors: Hugging Face names mapped onto llama.cpp's GGUF names for BERT, and the shapes a
config implies. One naming scheme for both formats, as for the llama family (model_check.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from tandem.formats.model_config import ModelConfig

_GLOBAL = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def bert_hf_to_gguf_name(hf_name: str) -> str | None:
    """The GGUF name of a BERT tensor (a ``bert.`` prefix, as BertForMaskedLM writes, is dropped);
    None for tensors the encoder does not use (the pooler, the MLM head, position_ids)."""
    name = hf_name.removeprefix("bert.")
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def bert_expected_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    h, ffn = cfg.hidden_size, cfg.intermediate_size
    yield "token_embd.weight", (cfg.vocab_size, h)
    yield "token_types.weight", (cfg.type_vocab_size, h)
    yield "token_embd_norm.weight", (h,)
    yield "token_embd_norm.bias", (h,)
    for i in range(cfg.num_layers):
        p = f"blk.{i}"
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            yield f"{p}.{n}.weight", (h, h)
            yield f"{p}.{n}.bias", (h,)
        yield f"{p}.ffn_up.weight", (ffn, h)
        yield f"{p}.ffn_up.bias", (ffn,)
        yield f"{p}.ffn_down.weight", (h, ffn)
        yield f"{p}.ffn_down.bias", (h,)
        for n in ("attn_output_norm", "layer_output_norm"):
            yield f"{p}.{n}.weight", (h,)
            yield f"{p}.{n}.bias", (h,)
