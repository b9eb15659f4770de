"""Random-weight GGUF files with the shapes of real models, for benchmarks that need no download.

The tensors have exactly the real model's shapes (layers, widths, heads, KV heads, vocabulary,
tied or untied output), so a step costs what the real model's step costs; the weights are random
Q4_0 codes with one small scale per tensor, written straight as bytes (no float weights are ever
made, so even an 8B-parameter file takes seconds of CPU, bounded by the disk). The vocabulary is
tandem's tiny byte-level one padded to the real size with tokens no text encodes to, so prompts
tokenize and every sampled id detokenizes. Not modelled: rope scaling and sliding windows, which
change no matmul shape.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# numpy and gguf are imported where files are written: the CLI reads SHAPES for its option
# choices, and every `tandem` command would otherwise pay for loading them.

log = logging.getLogger(__name__)

_Q4_0_BLOCK, _Q4_0_BYTES = 32, 18  # weights per block, bytes per block (an f16 scale + 16 nibble bytes)
_Q4_0_STD = 4.61  # std of (q - 8) for q uniform on 0..15: weight std = scale * this


@dataclass(frozen=True)
class SyntheticShape:
    name: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # at least the 271 tokens of tandem's tiny byte-level vocabulary, padded to this
    context: int
    rope_theta: float
    tie_embeddings: bool
    architecture: str = "llama"  # "qwen2": q/k/v biases
    cpu_ok: bool = True  # False: too big to load on a small CPU machine (a GPU run's shape)

    @property
    def parameters(self) -> int:
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.ffn
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + emb

    @property
    def file_bytes(self) -> int:
        """About what the file takes on disk (Q4_0: 18 bytes per 32 weights)."""
        return self.parameters * _Q4_0_BYTES // _Q4_0_BLOCK


SHAPES: dict[str, SyntheticShape] = {
    s.name: s
    for s in (
        # The bench's tiny pipeline model (tandem.bench.suite.TINY_SPEC): steps near 1 ms on a core.
        SyntheticShape("tiny", 64, 256, 4, 4, 2, 271, 2048, 10000.0, True),
        SyntheticShape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, 8192, 100000.0, True),
        SyntheticShape("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, 131072, 500000.0, True),
        SyntheticShape("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, 131072, 500000.0, False, cpu_ok=False),
        SyntheticShape(
            "qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, 32768, 1000000.0, False, "qwen2", cpu_ok=False
        ),
    )
}


def synthetic_shape(name: str) -> SyntheticShape:
    try:
        return SHAPES[name]
    except KeyError:
        raise ValueError(f"unknown synthetic shape {name!r} (one of {', '.join(SHAPES)})") from None


def _vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    import gguf

    from tandem.formats.tiny import tiny_vocab

    tokens, types, merges = tiny_vocab()
    if size < len(tokens):
        raise ValueError(f"a vocabulary of {size} is smaller than the byte-level base of {len(tokens)}")
    # Padding that no text reaches: no merge builds it, and the bytes it spells tokenize as bytes.
    pad = [f"<pad{i}>" for i in range(len(tokens), size)]
    return tokens + pad, types + [int(gguf.TokenType.NORMAL)] * len(pad), merges


class _Tensors:
    """The tensor list of one shape, in file order: (name, shape as rows x cols, quantized)."""

    def __init__(self, shape: SyntheticShape, vocab: int) -> None:
        s = shape
        kv = s.kv_heads * (s.hidden // s.heads)
        self.items: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (vocab, s.hidden), True)]
        self.items.append(("output_norm.weight", (s.hidden,), False))
        if not s.tie_embeddings:
            self.items.append(("output.weight", (vocab, s.hidden), True))
        for i in range(s.layers):
            p = f"blk.{i}"
            self.items += [
                (f"{p}.attn_norm.weight", (s.hidden,), False),
                (f"{p}.ffn_norm.weight", (s.hidden,), False),
            ]
            self.items += [
                (f"{p}.attn_q.weight", (s.hidden, s.hidden), True),
                (f"{p}.attn_k.weight", (kv, s.hidden), True),
                (f"{p}.attn_v.weight", (kv, s.hidden), True),
                (f"{p}.attn_output.weight", (s.hidden, s.hidden), True),
            ]
            if s.architecture == "qwen2":
                self.items += [
                    (f"{p}.attn_{x}.bias", (n,), False) for x, n in (("q", s.hidden), ("k", kv), ("v", kv))
                ]
            self.items += [
                (f"{p}.ffn_gate.weight", (s.ffn, s.hidden), True),
                (f"{p}.ffn_up.weight", (s.ffn, s.hidden), True),
                (f"{p}.ffn_down.weight", (s.hidden, s.ffn), True),
            ]


def _q4_0_bytes(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_0 blocks whose weights have std 1/sqrt(cols), as a uint8 (rows, bytes) array."""
    import numpy as np

    block, size = _Q4_0_BLOCK, _Q4_0_BYTES
    if cols % block:
        raise ValueError(f"Q4_0 needs rows of a multiple of {block} weights, got {cols}")
    raw = (
        np.frombuffer(rng.bytes(rows * (cols // block) * size), dtype=np.uint8).reshape(rows, -1, size).copy()
    )
    # A 1/sqrt(fan-in) spread keeps activations bounded through every layer of a random model.
    scale = np.float16(1.0 / math.sqrt(cols) / _Q4_0_STD)
    raw[:, :, 0:2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def _vector(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    import numpy as np

    around = 0.0 if name.endswith(".bias") else 1.0
    return (around + rng.standard_normal(n) * 0.05).astype(np.float32)


def write_synthetic_gguf(path: str | Path, shape: SyntheticShape | str, seed: int = 0) -> Path:
    """Write the shape's random-weight GGUF to ``path`` (tensor by tensor: memory stays at one tensor)."""
    import gguf
    import numpy as np

    from tandem.formats.tiny import add_llama_metadata

    s = synthetic_shape(shape) if isinstance(shape, str) else shape
    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, types, merges = _vocab(s.vocab)
    w = gguf.GGUFWriter(str(path), s.architecture)
    w.add_name(f"synthetic-{s.name}")
    add_llama_metadata(w, s, (tokens, types, merges))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    tensors = _Tensors(s, len(tokens)).items
    block, size, qtype = _Q4_0_BLOCK, _Q4_0_BYTES, gguf.GGMLQuantizationType.Q4_0
    for name, dims, quantized in tensors:
        if quantized:
            rows, cols = dims
            w.add_tensor_info(
                name, (rows, cols // block * size), np.dtype(np.uint8), rows * cols // block * size, qtype
            )
        else:
            w.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, dims, quantized in tensors:
        w.write_tensor_data(_q4_0_bytes(*dims, rng) if quantized else _vector(name, dims[0], rng))
    w.close()
    log.info("wrote %s (%s shape, %.1f MB)", path, s.name, path.stat().st_size / 1e6)
    return path
