"""Load model weights from GGUF files or Hugging Face safetensors folders into one naming scheme.

Both formats end up as a dict keyed by GGUF tensor names (``blk.0.attn_q.weight``...) in the
compute dtype, with Q/K rows in Hugging Face order (rotate-half rope), so one model class
serves both. Loading needs no device: the worker moves the tensors where they belong.
With ``packed``, quantized GGUF matrices stay quantized (``gguf_packed.AffineCodes``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.errors import UnsupportedModelError
from tandem.formats.dequant import SUPPORTED_TYPES, dequantize
from tandem.formats.gguf_file import GGUFFile
from tandem.formats.gguf_packed import PACKABLE_TYPES, AffineCodes, read_affine
from tandem.formats.model_check import (
    check_shard_index,
    check_tensor_shapes,
    gguf_config,
    hf_folder_config,
    hf_to_gguf_name,
)
from tandem.formats.model_config import ModelConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    config: ModelConfig
    tensors: dict[str, torch.Tensor | AffineCodes]
    load_seconds: float
    source_path: Path


def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time Q/K row permutation (adjacent-pair rope -> rotate-half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_heads(config: ModelConfig, name: str) -> int | None:
    """Heads of a llama Q/K tensor whose rows llama.cpp permuted at conversion, else None."""
    if config.architecture != "llama":
        return None
    if name.endswith(("attn_q.weight", "attn_q.bias")):
        return config.num_heads
    if name.endswith(("attn_k.weight", "attn_k.bias")):
        return config.num_kv_heads
    return None


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, packed: bool = False) -> LoadedModel:
    """``packed``: quantized matrices become ``AffineCodes`` (never fp32); the rest ``dtype``."""
    start = time.perf_counter()
    gf = GGUFFile(path)
    config = gguf_config(gf)  # every tensor the config needs is there, with its shape
    bad = sorted({t.ggml_type.name for t in gf.tensors.values() if t.ggml_type not in SUPPORTED_TYPES})
    if bad:
        raise UnsupportedModelError(f"{gf.path.name}: unsupported GGUF tensor type(s) {', '.join(bad)}")
    tensors: dict[str, torch.Tensor | AffineCodes] = {}
    for name, info in gf.tensors.items():
        t: torch.Tensor | AffineCodes
        if packed and info.ggml_type in PACKABLE_TYPES and len(info.shape) == 2:
            t = read_affine(gf.raw(name), info.ggml_type, info.shape)
        else:
            t = dequantize(gf.raw(name), info.ggml_type, info.shape, dtype=dtype)
        heads = _rope_heads(config, name)
        if heads is not None:
            t = (
                t.permute_rows(lambda r, h=heads: _unpermute_rope_rows(r, h))
                if isinstance(t, AffineCodes)
                else _unpermute_rope_rows(t, heads)
            )
        tensors[name] = t
    elapsed = time.perf_counter() - start
    log.info("loaded %s (%d tensors%s) in %.2f s", gf.path.name, len(tensors), ", packed" * packed, elapsed)
    return LoadedModel(config, tensors, elapsed, gf.path)


def load_safetensors_dir(path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    from safetensors import safe_open

    start = time.perf_counter()
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise UnsupportedModelError(f"{folder} has no config.json")
    config = hf_folder_config(folder)
    check_shard_index(folder)  # a shard deleted since the pull: name it, not the tensor it held
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{folder} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                name = hf_to_gguf_name(hf_name, config.architecture)
                if name is None:
                    log.debug("skipping tensor %s", hf_name)
                    continue
                t = f.get_tensor(hf_name)
                if config.architecture == "gemma3" and name.endswith("norm.weight"):
                    # Gemma's norms multiply by 1 + w; GGUF files store the sum (llama.cpp adds
                    # it at conversion), and the model reads that sum. Added in fp32, as HF does.
                    t = t.float() + 1.0
                tensors[name] = t.to(dtype)
    if config.tie_word_embeddings:
        tensors.pop("output.weight", None)
    check_tensor_shapes(config, {name: tuple(t.shape) for name, t in tensors.items()}, folder)
    elapsed = time.perf_counter() - start
    return LoadedModel(config, tensors, elapsed, folder)


def load_model_weights(
    path: str | Path, dtype: torch.dtype = torch.float32, packed: bool = False
) -> LoadedModel:
    """``packed`` keeps a GGUF file's quantized matrices packed; safetensors folders load dense."""
    p = Path(path)
    if p.is_dir():
        return load_safetensors_dir(p, dtype)
    return load_gguf(p, dtype, packed)
