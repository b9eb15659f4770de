"""Tiny random-weight llama GGUF files: fast stand-ins for real models in tests and benchmarks.

The vocabulary is byte-level BPE (every byte is a token, plus a few merges and the ChatML
control tokens), so any text round-trips through the real tokenizer code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGE_PAIRS = ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t", "e n", "Ġ o")

# K-quant block layouts: where the f16 super-block scales sit within a block (byte offsets).
_K_QUANT_F16_OFFSETS = {
    GGMLQuantizationType.Q4_K: (0, 2),
    GGMLQuantizationType.Q5_K: (0, 2),
    GGMLQuantizationType.Q6_K: (208,),
    GGMLQuantizationType.Q2_K: (80, 82),
    GGMLQuantizationType.Q3_K: (108,),
}


@cache
def byte_unicode_table() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return tuple(chr(table[b]) for b in range(256))


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = list(SPECIAL_TOKENS) + list(byte_unicode_table())
    types = [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS) + [gguf.TokenType.NORMAL] * 256
    merges: list[str] = []
    for pair in _MERGE_PAIRS:
        merged = pair.replace(" ", "")
        if merged not in tokens:
            tokens.append(merged)
            types.append(gguf.TokenType.NORMAL)
            merges.append(pair)
    return tokens, [int(t) for t in types], merges


@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    ffn: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 512
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32
    architecture: str = "llama"  # "qwen2" adds q/k/v biases
    tie_embeddings: bool = True
    seed: int = 0
    rope_theta: float = 10000.0
    weight_scale: float = 0.08
    chat_template: str = CHATML_TEMPLATE  # what the file's tokenizer.chat_template says
    pooling_type: int | None = None  # `{arch}.pooling_type` (llama.cpp's enum); None writes none


def _quantize(data: np.ndarray, qtype: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if qtype == GGMLQuantizationType.F16:
        return data.astype(np.float16)
    if qtype in _K_QUANT_F16_OFFSETS:
        # gguf has no K-quant encoder: random codes with small, valid f16 scales exercise the
        # decoder just as well for a random-weight model.
        block, size = GGML_QUANT_SIZES[qtype]
        rows, cols = data.shape
        raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
        # Q6_K multiplies its 6-bit codes by int8 sub-scales: a 10x smaller super-block scale keeps
        # its weights (std ~0.06) from making the random model chaotic, where any rounding explodes.
        lo, hi = (2e-5, 6e-5) if qtype == GGMLQuantizationType.Q6_K else (2e-4, 6e-4)
        for off in _K_QUANT_F16_OFFSETS[qtype]:
            scale = rng.uniform(lo, hi, size=(rows, cols // block)).astype(np.float16)
            raw[:, :, off : off + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
        return raw.reshape(rows, -1)
    return gguf.quants.quantize(data.astype(np.float32), qtype)


def add_llama_metadata(w: gguf.GGUFWriter, shape: Any, vocab: tuple[list[str], list[int], list[str]]) -> None:
    """The llama-family hyperparameters of ``shape`` (layers, context, hidden, ffn, heads, kv_heads,
    rope_theta) and the byte-level BPE vocabulary with ChatML, as every test-model writer needs."""
    w.add_block_count(shape.layers)
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.ffn)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(shape.hidden // shape.heads)
    add_tiny_tokenizer(w, vocab, getattr(shape, "chat_template", None) or CHATML_TEMPLATE)


def add_tiny_tokenizer(
    w: gguf.GGUFWriter, vocab: tuple[list[str], list[int], list[str]], chat_template: str = CHATML_TEMPLATE
) -> None:
    """tiny_vocab()'s byte-level BPE as GGUF tokenizer metadata (BOS 1, EOS 2, no BOS added)."""
    tokens, types, merges = vocab
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)


def write_tiny_gguf(path: str | Path, spec: TinySpec | None = None) -> Path:
    spec = spec or TinySpec()
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    arch = spec.architecture
    head_dim = spec.hidden // spec.heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}-{spec.qtype.name.lower()}")
    add_llama_metadata(w, spec, (tokens, types, merges))
    if spec.pooling_type is not None:
        w.add_uint32(gguf.Keys.LLM.POOLING_TYPE.format(arch=arch), spec.pooling_type)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (rng.standard_normal((rows, cols)) * spec.weight_scale).astype(np.float32)
        q = _quantize(data, spec.qtype, rng)
        if spec.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(name, q)
        else:
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=spec.qtype)

    def vector(name: str, n: int, around: float) -> None:
        w.add_tensor(name, (around + rng.standard_normal(n) * 0.05).astype(np.float32))

    matrix("token_embd.weight", vocab, spec.hidden)
    vector("output_norm.weight", spec.hidden, 1.0)
    if not spec.tie_embeddings:
        matrix("output.weight", vocab, spec.hidden)
    kv_dim = spec.kv_heads * head_dim
    for i in range(spec.layers):
        p = f"blk.{i}"
        vector(f"{p}.attn_norm.weight", spec.hidden, 1.0)
        vector(f"{p}.ffn_norm.weight", spec.hidden, 1.0)
        matrix(f"{p}.attn_q.weight", spec.hidden, spec.hidden)
        matrix(f"{p}.attn_k.weight", kv_dim, spec.hidden)
        matrix(f"{p}.attn_v.weight", kv_dim, spec.hidden)
        matrix(f"{p}.attn_output.weight", spec.hidden, spec.hidden)
        if arch == "qwen2":
            vector(f"{p}.attn_q.bias", spec.hidden, 0.0)
            vector(f"{p}.attn_k.bias", kv_dim, 0.0)
            vector(f"{p}.attn_v.bias", kv_dim, 0.0)
        matrix(f"{p}.ffn_gate.weight", spec.ffn, spec.hidden)
        matrix(f"{p}.ffn_up.weight", spec.ffn, spec.hidden)
        matrix(f"{p}.ffn_down.weight", spec.hidden, spec.ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
