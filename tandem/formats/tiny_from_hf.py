"""Write a tiny transformers model as a GGUF file, laid out as llama.cpp's converter lays it out.

The equivalence tests build random-weight models with transformers' config classes (Llama,
Mistral, Qwen3, Gemma 3 text), save them as safetensors folders, and write the same weights
here: tensor names mapped to GGUF's, llama's Q/K rows permuted the way llama.cpp permutes them,
Gemma's norm weights stored as ``1 + w`` (llama.cpp adds the 1 at conversion), and the
hyperparameters as ``{arch}.*`` metadata. The vocabulary is tiny.py's byte-level BPE, so the file
is a complete model that tandem can serve; the transformers config must use its size.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from tandem.formats.model_check import hf_to_gguf_name
from tandem.formats.tiny import add_tiny_tokenizer, tiny_vocab

_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen3": "qwen3", "gemma3_text": "gemma3"}
_GEMMA3_LOCAL_THETA = 10000.0  # llama.cpp's fixed base for Gemma 3's sliding layers


def _permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time Q/K row order for llama (rotate-half -> adjacent pairs)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_params(config: Mapping[str, Any], layer_type: str = "full_attention") -> Mapping[str, Any]:
    params = config.get("rope_parameters") or {}
    return params.get(layer_type, {}) if "full_attention" in params else params


def _rope_theta(config: Mapping[str, Any], layer_type: str = "full_attention") -> float:
    return float(_rope_params(config, layer_type).get("rope_theta", config.get("rope_theta", 10000.0)))


def write_gguf_from_hf(
    path: str | Path,
    config: Mapping[str, Any],
    state: Mapping[str, np.ndarray],
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
) -> Path:
    """``config``: the model's ``config.to_dict()``; ``state``: its state dict as fp32 numpy.
    ``qtype``: how 2-D weights are stored (F32, F16, or a type ``gguf.quants`` can encode)."""
    path = Path(path)
    model_type = str(config["model_type"])
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"no GGUF layout for model_type {model_type!r}")
    arch = _ARCHITECTURES[model_type]
    gemma = arch == "gemma3"
    tokens, types, merges = tiny_vocab()
    if config["vocab_size"] != len(tokens):
        raise ValueError(f"the config's vocab_size must be tiny.py's vocabulary size, {len(tokens)}")
    heads, kv_heads = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    if gemma and (
        config.get("query_pre_attn_scalar") != head_dim
        or _rope_theta(config, "sliding_attention") != _GEMMA3_LOCAL_THETA
    ):
        raise ValueError("llama.cpp's Gemma 3 scales attention by head_dim and fixes the local rope base")

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{model_type}")
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_context_length(int(config["max_position_embeddings"]))
    w.add_embedding_length(int(config["hidden_size"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    rope = _rope_params(config)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type", "default") != "default":
        raise ValueError(f"no GGUF form for rope type {rope['rope_type']!r}")
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    window = config.get("sliding_window")
    if window is not None:
        w.add_sliding_window(int(window))
        layer_types = config.get("layer_types") or ["sliding_attention"] * int(config["num_hidden_layers"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if config.get("final_logit_softcapping") is not None:
        w.add_float32(f"{arch}.final_logit_softcapping", float(config["final_logit_softcapping"]))
    add_tiny_tokenizer(w, (tokens, types, merges))

    for hf_name, value in state.items():
        name = hf_to_gguf_name(hf_name, arch)
        if name is None or (name == "output.weight" and config.get("tie_word_embeddings")):
            continue
        t = np.asarray(value, dtype=np.float32)
        if arch == "llama" and name.endswith("attn_q.weight"):
            t = _permute_rope_rows(t, heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            t = _permute_rope_rows(t, kv_heads)
        if gemma and name.endswith("norm.weight"):
            t = t + 1.0
        if t.ndim == 1 or qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, t)
        elif qtype == GGMLQuantizationType.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            q = gguf.quants.quantize(t, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
