"""Whether a model file is fit to load, decided from its headers alone (no weights read, no torch).

At pull time `check_model_path` validates the structure: a GGUF file's header, tensor table and
data extents (GGUFFile checks them as it parses), or a safetensors folder's files and each shard's
header and data extents. At load `read_model_config` also checks that every tensor the model's
config needs is there with the shape the config implies. Each failure is a ModelFileError naming
the file and the problem (the tensor and both shapes, for a shape).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tandem.errors import ModelFileError, ModelStoreError, quoted
from tandem.formats.bert_names import bert_expected_shapes, bert_hf_to_gguf_name
from tandem.formats.file_access import open_regular, read_regular_text, stat_regular
from tandem.formats.gguf_file import GGUFFile
from tandem.formats.model_config import (
    ModelConfig,
    config_from_gguf,
    config_from_hf,
    with_sentence_transformers,
)

Shape = tuple[int, ...]

HF_REQUIRED = ("config.json", "tokenizer.json")
_MAX_SAFETENSORS_HEADER = 100_000_000
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

_HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}
# Gemma 3 norms its sublayers' outputs too: its post_attention_layernorm is not llama's ffn_norm.
_HF_GEMMA3_LAYER_NAMES = {
    **_HF_LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
_HF_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_gguf_name(hf_name: str, architecture: str = "llama") -> str | None:
    """The GGUF name of a Hugging Face tensor, or None for tensors the model does not use."""
    if architecture == "bert":
        return bert_hf_to_gguf_name(hf_name)
    if hf_name in _HF_GLOBAL_NAMES:
        return _HF_GLOBAL_NAMES[hf_name]
    names = _HF_GEMMA3_LAYER_NAMES if architecture == "gemma3" else _HF_LAYER_NAMES
    m = _HF_LAYER_RE.match(hf_name)
    if m and m.group(2) in names:
        return f"blk.{m.group(1)}.{names[m.group(2)]}"
    return None


# --- pull time: structure ------------------------------------------------------------------------


def check_model_path(path: Path) -> tuple[str, int]:
    """Validate a .gguf file or safetensors folder; returns (format, size in bytes)."""
    if path.is_dir():
        shards = check_safetensors_folder(path)
        return "safetensors", sum(p.stat().st_size for p in shards)
    size = stat_regular(path).st_size
    GGUFFile(path)  # parsing is validating
    return "gguf", size


def check_safetensors_folder(folder: Path) -> list[Path]:
    """The folder's shards, once its files are regular and every shard's header and extents are sound."""
    shards = sorted(folder.glob("*.safetensors"))
    missing = [n for n in HF_REQUIRED if not (folder / n).is_file()] + ([] if shards else ["*.safetensors"])
    if missing:
        raise ModelStoreError(f"{folder} is not a Hugging Face safetensors folder: no {', '.join(missing)}")
    for name in HF_REQUIRED:
        stat_regular(folder / name)
    read_hf_config_json(folder)
    check_shard_index(folder)
    for shard in shards:
        safetensors_header(shard)
    return shards


SHARD_INDEX = "model.safetensors.index.json"


def check_shard_index(folder: Path) -> None:
    """A sharded checkpoint's index names every shard: one that is missing (a download cut short)
    would otherwise load as a model that lacks some tensor, and say only that."""
    index = folder / SHARD_INDEX
    if not index.exists():
        return
    try:
        body = json.loads(read_regular_text(index))
    except ValueError:
        raise ModelFileError(index, "is not valid JSON") from None
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelFileError(index, "has no weight_map of tensor names to shard files")
    for shard in sorted(set(weight_map.values())):
        # A bare file name in this folder: an index must not point the loader anywhere else.
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise ModelFileError(index, f"names the shard {quoted(shard)}, which is not a file in the folder")
        if not (folder / shard).is_file():
            raise ModelFileError(index, f"names the shard {quoted(shard)}, which is missing")


def read_hf_config_json(folder: Path) -> dict[str, Any]:
    try:
        body = json.loads(read_regular_text(folder / "config.json"))
    except ValueError:
        raise ModelFileError(folder / "config.json", "is not valid JSON") from None
    if not isinstance(body, dict):
        raise ModelFileError(folder / "config.json", "is not a JSON object")
    return body


def safetensors_header(path: Path) -> dict[str, Any]:
    """A shard's JSON header, once every tensor in it has a known dtype and its data lies in the file."""
    with open_regular(path) as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 0 < n <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ModelFileError(path, "not a safetensors file (no valid header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise ModelFileError(path, "has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFileError(path, "has a corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    for name, meta in header.items():
        if name != "__metadata__":
            _check_safetensors_entry(path, name, meta, data_bytes)
    return header


def _check_safetensors_entry(path: Path, name: str, meta: Any, data_bytes: int) -> None:
    shown = quoted(name)
    try:
        itemsize = _SAFETENSORS_DTYPE_BYTES[meta["dtype"]]
        shape = [int(d) for d in meta["shape"]]
        begin, end = (int(x) for x in meta["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ModelFileError(path, f"tensor {shown} has no valid dtype, shape and data_offsets") from None
    if min(shape, default=0) < 0 or not 0 <= begin <= end:
        raise ModelFileError(path, f"tensor {shown} has a negative dimension or offset")
    if end > data_bytes:
        raise ModelFileError(path, f"tensor {shown} extends past the end of the file: the file is truncated")
    needed = math.prod(shape) * itemsize
    if end - begin != needed:
        raise ModelFileError(path, f"tensor {shown} holds {end - begin} bytes, its shape needs {needed}")


# --- load time: the config and the shapes it implies ---------------------------------------------


def read_model_config(path: Path) -> ModelConfig:
    """The model's config, once its tensors match it (see check_tensor_shapes)."""
    if path.is_dir():
        return safetensors_config(path)
    return gguf_config(GGUFFile(path))


def gguf_config(gf: GGUFFile) -> ModelConfig:
    config = config_from_gguf(gf.metadata, set(gf.tensors), gf.path)
    check_tensor_shapes(config, gf.shapes(), gf.path)
    return config


def hf_folder_config(folder: Path) -> ModelConfig:
    """config.json's config, amended by the sentence-transformers files beside it (if any)."""
    config = config_from_hf(read_hf_config_json(folder), folder)
    return with_sentence_transformers(config, folder, _read_optional_json)


def _read_optional_json(path: Path) -> Any:
    if not path.is_file():
        return {}
    try:
        return json.loads(read_regular_text(path))
    except ValueError:
        raise ModelFileError(path, "is not valid JSON") from None


def safetensors_config(folder: Path) -> ModelConfig:
    config = hf_folder_config(folder)
    check_shard_index(folder)  # a shard deleted since the pull: name it, not a tensor it held
    shapes: dict[str, Shape] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for hf_name, meta in safetensors_header(shard).items():
            name = hf_to_gguf_name(hf_name, config.architecture) if hf_name != "__metadata__" else None
            if name is not None:
                shapes[name] = tuple(int(d) for d in meta["shape"])
    check_tensor_shapes(config, shapes, folder)
    return config


def expected_shapes(cfg: ModelConfig) -> Iterator[tuple[str, Shape]]:
    """Every tensor the model reads, with the shape (rows, cols) its config implies.

    Lazily, layer by layer: a corrupt layer count of billions must fail at the first missing
    layer, not build billions of entries first.
    """
    h, v, ffn = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    yield "token_embd.weight", (v, h)
    yield "output_norm.weight", (h,)
    if not cfg.tie_word_embeddings:
        yield "output.weight", (v, h)
    for i in range(cfg.num_layers):
        p = f"blk.{i}"
        yield from {
            f"{p}.attn_norm.weight": (h,),
            f"{p}.ffn_norm.weight": (h,),
            f"{p}.attn_q.weight": (q, h),
            f"{p}.attn_k.weight": (kv, h),
            f"{p}.attn_v.weight": (kv, h),
            f"{p}.attn_output.weight": (h, q),
            f"{p}.ffn_gate.weight": (ffn, h),
            f"{p}.ffn_up.weight": (ffn, h),
            f"{p}.ffn_down.weight": (h, ffn),
        }.items()
        if cfg.qk_norm:
            yield f"{p}.attn_q_norm.weight", (cfg.head_dim,)
            yield f"{p}.attn_k_norm.weight", (cfg.head_dim,)
        if cfg.architecture == "gemma3":
            yield f"{p}.post_attention_norm.weight", (h,)
            yield f"{p}.post_ffw_norm.weight", (h,)
        if cfg.attention_bias:
            yield from {
                f"{p}.attn_q.bias": (q,),
                f"{p}.attn_k.bias": (kv,),
                f"{p}.attn_v.bias": (kv,),
            }.items()


def check_tensor_shapes(cfg: ModelConfig, shapes: Mapping[str, Shape], source: str | Path) -> None:
    """ModelFileError naming the first tensor that is missing or whose shape the config does not imply."""
    expected = bert_expected_shapes(cfg) if cfg.architecture == "bert" else expected_shapes(cfg)
    if "rope_freqs.weight" in shapes:  # optional: llama3 rope scaling baked into the file
        expected = itertools.chain(expected, [("rope_freqs.weight", (cfg.head_dim // 2,))])
    for name, want in expected:
        if name not in shapes:
            raise ModelFileError(source, f"lacks the tensor {name} that its config ({_summary(cfg)}) needs")
        got = tuple(shapes[name])
        if got != want:
            raise ModelFileError(
                source,
                f"tensor {name} has shape {list(got)}, but the model's config ({_summary(cfg)}) needs "
                f"{list(want)}",
            )


def _summary(cfg: ModelConfig) -> str:
    return (
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads ({cfg.num_kv_heads} KV) "
        f"of {cfg.head_dim}, ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}"
    )
