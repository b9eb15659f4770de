"""What `tandem show` prints about a stored model, read from the file's header without loading weights.

GGUF files are described from their metadata and tensor table, safetensors folders from config.json,
the shards' JSON headers and the tokenizer config.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from tandem.errors import ModelFileError, ModelStoreError
from tandem.formats.file_access import read_regular_text
from tandem.store.model_store import resolve_model
from tandem.store.registry import ModelRef


def describe_model(model: ModelRef | str) -> dict[str, Any]:
    """What `tandem show` prints: architecture, sizes, quantization, chat template, file facts."""
    ref = resolve_model(model) if isinstance(model, str) else model
    details = _describe_gguf(ref.path) if ref.format == "gguf" else _describe_safetensors(ref.path)
    derived = (
        {"derived": ref.defaults.to_json(), "modelfile": ref.defaults.modelfile()} if ref.defaults else {}
    )
    return {
        "name": ref.name,
        "format": ref.format,
        "path": str(ref.path),
        "size_bytes": ref.size_bytes,
        "sha256": ref.sha256,
        "source": ref.source,
        **details,
        **derived,
    }


def _describe_gguf(path: Path) -> dict[str, Any]:
    import gguf

    from tandem.formats.gguf_file import GGUFFile

    try:
        gf = GGUFFile(path)  # header only: tensor data stays memory-mapped and unread
    except OSError as e:
        raise ModelStoreError(f"cannot read GGUF file {path}: {e.strerror}") from e
    meta = gf.metadata

    def get(key: str) -> Any:
        return _plain(meta.get(key))

    arch = get("general.architecture") or "unknown"
    params = sum(t.num_elements for t in gf.tensors.values())
    tokens = meta.get("tokenizer.ggml.tokens")
    file_type = get("general.file_type")
    with_names = {t.value: t.name.removeprefix("MOSTLY_") for t in gguf.LlamaFileType}
    return _summary(
        architecture=arch,
        model_name=get("general.name"),
        parameters=params,
        quantization=Counter(t.ggml_type.name for t in gf.tensors.values()),
        file_type=with_names.get(file_type, file_type),
        context_length=get(f"{arch}.context_length"),
        embedding_length=get(f"{arch}.embedding_length"),
        feed_forward_length=get(f"{arch}.feed_forward_length"),
        layers=get(f"{arch}.block_count"),
        heads=get(f"{arch}.attention.head_count"),
        kv_heads=get(f"{arch}.attention.head_count_kv"),
        vocab_size=get(f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None),
        chat_template=get("tokenizer.chat_template"),
        pooling_type=get(f"{arch}.pooling_type"),  # what /api/show's capabilities read before loading
    )


def _describe_safetensors(path: Path) -> dict[str, Any]:
    from tandem.formats.model_check import read_hf_config_json, safetensors_header

    config = read_hf_config_json(path)
    dtypes: Counter[str] = Counter()
    params = 0
    for shard in sorted(path.glob("*.safetensors")):
        for tensor, meta in safetensors_header(shard).items():
            if tensor != "__metadata__":
                dtypes[meta["dtype"]] += 1
                params += math.prod(meta["shape"])
    return _summary(
        architecture=config.get("model_type") or (config.get("architectures") or ["unknown"])[0],
        model_name=path.name,
        parameters=params,
        quantization=dtypes,
        file_type=config.get("torch_dtype") or config.get("dtype"),
        context_length=config.get("max_position_embeddings"),
        embedding_length=config.get("hidden_size"),
        feed_forward_length=config.get("intermediate_size"),
        layers=config.get("num_hidden_layers"),
        heads=config.get("num_attention_heads"),
        kv_heads=config.get("num_key_value_heads", config.get("num_attention_heads")),
        vocab_size=config.get("vocab_size"),
        chat_template=_hf_chat_template(path),
    )


def _summary(*, parameters: int, quantization: Counter[str], chat_template: str | None, **rest: Any) -> dict:
    return {
        **rest,
        "parameters": parameters,
        "parameter_size": human_count(parameters),
        "quantization": dict(quantization.most_common()),
        "chat_template_present": chat_template is not None,
        "chat_template": chat_template,
    }


def _hf_chat_template(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return read_regular_text(path / "chat_template.jinja")
    if not (path / "tokenizer_config.json").is_file():
        return None
    template = _read_json(path / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template


def _read_json(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(read_regular_text(path))
    except ValueError:
        raise ModelFileError(path, "is not valid JSON") from None
    if not isinstance(body, dict):
        raise ModelFileError(path, "is not a JSON object")
    return body


def _plain(value: Any) -> Any:
    """numpy scalars (as gguf returns them) -> Python values, so the result is JSON-serialisable."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
