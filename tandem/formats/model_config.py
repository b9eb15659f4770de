"""A model's architecture hyper-parameters (ModelConfig), read from GGUF metadata or a Hugging Face
config.json; nothing is guessed.

What a file does not say raises UnsupportedModelError; what it says wrongly (a count that is not a
positive integer, a missing config.json key) raises ModelFileError naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tandem.errors import ModelFileError, UnsupportedModelError, quoted

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
# llama.cpp's Gemma 3 convention where the file gives no pattern: every 6th layer is global, the
# rest slide; the sliding layers' rope base is fixed at 10000.
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_THETA = 10000.0
# Encoders: they embed and never generate (no KV cache, no head).
ENCODER_ARCHITECTURES = ("bert",)
_HF_ENCODERS = {"BertModel": "bert", "BertForMaskedLM": "bert"}
POOLINGS = ("mean", "cls", "last")
# A GGUF that declares a pooling giving no one vector an input (llama.cpp's none: a vector a
# token; rank: a reranker's score): the model does not embed.
NO_POOLING = "none"


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.x style frequency-dependent rope scaling ("llama3"), or positions divided by
    ``factor`` ("linear", Gemma 3's global layers)."""

    kind: str = "llama3"  # "llama3" | "linear"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # one of SUPPORTED_ARCHITECTURES
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3, Gemma 3)
    # Keys a sliding layer's query sees, itself included (HF's convention: key j is visible from
    # query i when i - j < sliding_window). Which layers slide: sliding_layers, one flag a layer.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_local_theta: float | None = None  # sliding layers' rope base when it differs (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale is its -1/2 power; None: head_dim
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and bool(self.sliding_layers) and self.sliding_layers[layer]

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    # Embeddings: how the final hidden states become one vector ("" for a generative model, which
    # embeds with last-token pooling, normalized: see `embedding_pooling`). Encoders (BERT) only.
    pooling: str = ""
    normalize: bool = False
    layer_norm_eps: float = 0.0
    type_vocab_size: int = 0

    @property
    def is_encoder(self) -> bool:
        return self.architecture in ENCODER_ARCHITECTURES

    @property
    def embeds(self) -> bool:
        """Whether the model embeds (ollama's "embedding" capability): every one but a file that
        declares a pooling without one vector an input (a reranker's rank, or none)."""
        return self.pooling != NO_POOLING

    @property
    def embedding_pooling(self) -> tuple[str, bool]:
        """(pooling, normalize) of the model's embeddings. A model that declares none (every
        generative one) pools its last token, L2-normalized: the hidden state that has attended to
        the whole input, as decoder embedding models (e5-mistral, Qwen3-Embedding) are trained."""
        return (self.pooling, self.normalize) if self.pooling in POOLINGS else ("last", True)


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise UnsupportedModelError(f"GGUF metadata lacks required key {key!r}")
    return meta[key]


def _count(meta: dict[str, Any], key: str, source: str | Path, default: Any = None) -> int:
    value = _require(meta, key) if default is None else meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelFileError(source, f"metadata {key} is not a positive integer")
    return value


def _number(meta: dict[str, Any], key: str, source: str | Path, default: float) -> float:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ModelFileError(source, f"metadata {key} is not a number")
    return float(value)


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str | Path) -> ModelConfig:
    arch = str(meta.get("general.architecture", ""))
    if arch in ENCODER_ARCHITECTURES:
        return _bert_config_from_gguf(meta, source)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {quoted(arch)} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    hidden = _count(meta, f"{arch}.embedding_length", source)
    n_heads = _count(meta, f"{arch}.attention.head_count", source)
    n_kv = _count(meta, f"{arch}.attention.head_count_kv", source, n_heads)
    head_dim = _count(meta, f"{arch}.attention.key_length", source, max(1, hidden // n_heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    if f"{arch}.vocab_size" not in meta and not tokens:
        raise UnsupportedModelError("GGUF metadata gives no vocabulary size")
    vocab = _count(meta, f"{arch}.vocab_size", source, len(tokens) if isinstance(tokens, list) else 0)
    rope_dims = _count(meta, f"{arch}.rope.dimension_count", source, head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(
            f"partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported"
        )
    scaling = None
    scaling_type = meta.get(f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        scaling = RopeScaling(kind="linear", factor=_number(meta, f"{arch}.rope.scaling.factor", source, 1.0))
    elif scaling_type not in (None, "none"):
        # Llama 3.x GGUFs bake the llama3 scaling into a rope_freqs tensor instead; yarn differs.
        raise UnsupportedModelError(f"rope scaling type {quoted(str(scaling_type))} is not supported")
    num_layers = _count(meta, f"{arch}.block_count", source)
    eos_ids = tuple(
        dict.fromkeys(_token_id(meta, f"tokenizer.ggml.{k}_token_id", source) for k in ("eos", "eot"))
    )
    bos = _token_id(meta, "tokenizer.ggml.bos_token_id", source)
    return ModelConfig(
        architecture=arch,
        num_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=_count(meta, f"{arch}.feed_forward_length", source),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        vocab_size=vocab,
        context_length=_count(meta, f"{arch}.context_length", source, 2048),
        rms_norm_eps=_number(meta, f"{arch}.attention.layer_norm_rms_epsilon", source, 1e-5),
        rope_theta=_number(meta, f"{arch}.rope.freq_base", source, 10000.0),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=scaling,
        bos_token_id=bos,
        eos_token_ids=tuple(i for i in eos_ids if i is not None),
        name=str(meta.get("general.name", "")),
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        **_gguf_decoder_pooling(meta, arch),
        **_gguf_gemma3_fields(meta, arch, num_layers, hidden, n_heads, source),
        **_gguf_sliding_fields(meta, arch, num_layers, source),
    )


# llama.cpp's enum llama_pooling_type, as `{arch}.pooling_type` stores it (0 none, 4 rank: a
# reranker's classifier head; neither gives one vector an input).
_GGUF_POOLINGS = {1: "mean", 2: "cls", 3: "last"}


def pooling_type_embeds(value: Any) -> bool:
    """Whether a GGUF's `{arch}.pooling_type` (None where the file has none) gives one vector an
    input, so that the model embeds."""
    return value is None or (
        isinstance(value, int) and not isinstance(value, bool) and value in _GGUF_POOLINGS
    )


def _gguf_decoder_pooling(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    """A generative GGUF's `{arch}.pooling_type`, which llama.cpp's converter writes only for
    embedding and reranking models (Qwen3-Embedding: last; Qwen3-Reranker: rank). Absent, the
    model embeds with the default (last token, normalized)."""
    value = meta.get(f"{arch}.pooling_type")
    if value is None:
        return {}
    return {"pooling": _GGUF_POOLINGS[value] if pooling_type_embeds(value) else NO_POOLING, "normalize": True}


def _bert_config_from_gguf(meta: dict[str, Any], source: str | Path) -> ModelConfig:
    """A BERT GGUF as llama.cpp's convert_hf_to_gguf.py writes it. The file has no normalization
    flag; llama.cpp's embedding tools (and ollama) L2-normalize by default, and so does this."""
    pooling_value = meta.get("bert.pooling_type", 1)  # absent: mean, sentence-transformers' default
    pooling = _GGUF_POOLINGS.get(pooling_value) if isinstance(pooling_value, int) else None
    if pooling is None:
        raise UnsupportedModelError(
            f"BERT pooling type {quoted(str(pooling_value))} (bert.pooling_type) is not supported "
            "(supported: 1 mean, 2 cls, 3 last)"
        )
    if meta.get("bert.attention.causal", False):
        raise UnsupportedModelError("a causal BERT (bert.attention.causal is true) is not supported")
    hidden = _count(meta, "bert.embedding_length", source)
    n_heads = _count(meta, "bert.attention.head_count", source)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _count(meta, "bert.vocab_size", source, len(tokens) if isinstance(tokens, list) else 0)
    return ModelConfig(
        architecture="bert",
        num_layers=_count(meta, "bert.block_count", source),
        hidden_size=hidden,
        intermediate_size=_count(meta, "bert.feed_forward_length", source),
        num_heads=n_heads,
        num_kv_heads=n_heads,
        head_dim=max(1, hidden // n_heads),
        vocab_size=vocab,
        context_length=_count(meta, "bert.context_length", source, 512),
        rms_norm_eps=0.0,
        rope_theta=0.0,
        tie_word_embeddings=False,
        attention_bias=True,
        name=str(meta.get("general.name", "")),
        pooling=pooling,
        normalize=True,
        layer_norm_eps=_number(meta, "bert.attention.layer_norm_epsilon", source, 1e-12),
        type_vocab_size=_count(meta, "tokenizer.ggml.token_type_count", source, 2),
    )


def _gguf_sliding_fields(
    meta: dict[str, Any], arch: str, num_layers: int, source: str | Path
) -> dict[str, Any]:
    """sliding_window and sliding_layers: `{arch}.attention.sliding_window` with its pattern (an
    int n, every nth layer global, or one bool a layer, True for sliding); Gemma 3 defaults to 6."""
    key = f"{arch}.attention.sliding_window"
    if key not in meta:
        return {}
    window = _count(meta, key, source)
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern", _GEMMA3_PATTERN if arch == "gemma3" else 0)
    if isinstance(pattern, list):
        if len(pattern) != num_layers or not all(isinstance(b, bool) for b in pattern):
            raise ModelFileError(source, f"metadata {key}_pattern is not one flag a layer")
        layers = tuple(pattern)
    elif isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
        raise ModelFileError(source, f"metadata {key}_pattern is not a count")
    else:  # llama.cpp's set_swa_pattern: n == 0 means every layer slides
        layers = tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(num_layers))
    return {"sliding_window": window, "sliding_layers": layers}


def _gguf_gemma3_fields(
    meta: dict[str, Any], arch: str, num_layers: int, hidden: int, n_heads: int, source: str | Path
) -> dict[str, Any]:
    if arch != "gemma3":
        return {}
    cap_key = f"{arch}.final_logit_softcapping"
    scalar = None
    if f"{arch}.attention.scale" in meta:
        scalar = _number(meta, f"{arch}.attention.scale", source, 1.0) ** -2
    elif num_layers == 62:
        # llama.cpp: Gemma 3 27B scales by hidden / heads (its query_pre_attn_scalar, 168), not
        # head_dim; the GGUF has no key for it, so llama.cpp recognises the model by its depth.
        scalar = hidden / n_heads
    return {
        "rope_local_theta": _GEMMA3_LOCAL_THETA,
        "query_pre_attn_scalar": scalar,
        "final_logit_softcap": _number(meta, cap_key, source, 0) if cap_key in meta else None,
    }


def _token_id(meta: dict[str, Any], key: str, source: str | Path) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelFileError(source, f"metadata {key} is not a token id")
    return value


def config_from_hf(cfg: dict[str, Any], source: str | Path) -> ModelConfig:
    """source: the folder, for errors."""
    try:
        return _config_from_hf(cfg)
    except UnsupportedModelError:
        raise
    except KeyError as e:
        raise ModelFileError(source, f"config.json lacks the key {str(e.args[0])[:64]!r}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError):
        # No detail: the exception's text would quote the file's values.
        raise ModelFileError(source, "config.json has a value of the wrong type") from None


def _config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    archs = cfg.get("architectures") or []
    if any(a in _HF_ENCODERS for a in archs) or (not archs and cfg.get("model_type") == "bert"):
        return _bert_config_from_hf(cfg)
    arch = next((_HF_ARCHITECTURES[a] for a in archs if a in _HF_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.get('model_type')!r} "
            f"(supported: {', '.join(_HF_ARCHITECTURES)})"
        )
    hidden = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    # transformers >= 5 writes "rope_parameters" (theta included; Gemma 3: one dict per layer
    # type); older configs "rope_scaling" and "rope_theta" (Gemma 3: and "rope_local_base_freq").
    rope_params = cfg.get("rope_parameters") or {}
    local_params: dict[str, Any] = {}
    if arch == "gemma3" and "full_attention" in rope_params:
        local_params = rope_params.get("sliding_attention") or {}
        rope_params = rope_params["full_attention"]
    scaling = _hf_rope_scaling(cfg.get("rope_scaling") or rope_params)
    if local_params and _hf_rope_scaling(local_params) is not None:
        raise UnsupportedModelError("rope scaling on sliding layers is not supported")
    num_layers = int(cfg["num_hidden_layers"])
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
    gemma = arch == "gemma3"
    if gemma and cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError("attention logit soft-capping is not supported")
    if gemma and cfg.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"Gemma 3 activation {cfg['hidden_activation']!r} is not supported")
    local_theta = local_params.get("rope_theta", cfg.get("rope_local_base_freq", _GEMMA3_LOCAL_THETA))
    cap = cfg.get("final_logit_softcapping")
    return ModelConfig(
        architecture=arch,
        num_layers=num_layers,
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=n_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads", n_heads)),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        vocab_size=int(cfg["vocab_size"]),
        context_length=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
        rope_scaling=scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        name=str(cfg.get("_name_or_path", "")),
        qk_norm=arch in ("qwen3", "gemma3"),
        **_hf_sliding_fields(cfg, arch, num_layers),
        rope_local_theta=float(local_theta) if gemma else None,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)) if gemma else None,
        final_logit_softcap=float(cap) if cap is not None else None,
    )


def _hf_rope_scaling(rs: dict[str, Any]) -> RopeScaling | None:
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        return RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rs["factor"]))
    if kind not in (None, "default"):
        raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")
    return None


def _hf_sliding_fields(cfg: dict[str, Any], arch: str, num_layers: int) -> dict[str, Any]:
    """Which layers slide, as transformers decides: `layer_types` where the config has it; else
    Mistral slides every layer, Qwen only with `use_sliding_window`, Gemma 3 by its pattern."""
    window = cfg.get("sliding_window")
    if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if window is None:
        return {}
    types = cfg.get("layer_types")
    if types is not None:
        if len(types) != num_layers:
            raise ValueError("layer_types has not one entry a layer")
        layers = tuple(t == "sliding_attention" for t in types)
    elif arch == "gemma3":
        n = int(cfg.get("sliding_window_pattern", _GEMMA3_PATTERN))
        layers = tuple(bool((i + 1) % n) for i in range(num_layers))
    elif arch == "llama":  # MistralForCausalLM (a LlamaForCausalLM config has no window)
        layers = (True,) * num_layers
    else:  # Qwen's max_window_layers: layers from it on slide
        first = int(cfg.get("max_window_layers", num_layers))
        layers = tuple(i >= first for i in range(num_layers))
    return {"sliding_window": int(window), "sliding_layers": layers}


def _bert_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """BERT's config.json. Pooling and normalization are the sentence-transformers folder's to say
    (`with_sentence_transformers`); a bare BERT folder pools by mean, unnormalized."""
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(f"BERT position embeddings {cfg['position_embedding_type']!r}")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedModelError(f"BERT activation {cfg['hidden_act']!r} (only gelu)")
    hidden = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    return ModelConfig(
        architecture="bert",
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=n_heads,
        num_kv_heads=n_heads,
        head_dim=hidden // n_heads,
        vocab_size=int(cfg["vocab_size"]),
        context_length=int(cfg.get("max_position_embeddings", 512)),
        rms_norm_eps=0.0,
        rope_theta=0.0,
        tie_word_embeddings=False,
        attention_bias=True,
        name=str(cfg.get("_name_or_path", "")),
        pooling="mean",
        normalize=False,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        type_vocab_size=int(cfg.get("type_vocab_size", 2)),
    )


def with_sentence_transformers(config: ModelConfig, folder: Path, read: Any) -> ModelConfig:
    """The config as a sentence-transformers folder amends it: pooling (1_Pooling/config.json),
    normalization (a Normalize module in modules.json) and the input limit it was trained with
    (sentence_bert_config.json's max_seq_length). ``read(path) -> dict`` reads one JSON file ({}
    when absent)."""
    modules = read(folder / "modules.json")
    if not isinstance(modules, list):
        return config
    pooling, normalize = config.pooling, config.normalize
    for m in modules:
        kind = str(m.get("type", "")) if isinstance(m, dict) else ""
        if kind.endswith(".Pooling"):
            pc = read(folder / str(m.get("path", "")) / "config.json")
            if pc.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif pc.get("pooling_mode_lasttoken"):
                pooling = "last"
            elif pc.get("pooling_mode_mean_tokens", True):
                pooling = "mean"
            if any(pc.get(k) for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens")):
                raise UnsupportedModelError("pooling other than mean, cls or last token")
        elif kind.endswith(".Normalize"):
            normalize = True
    limit = read(folder / "sentence_bert_config.json").get("max_seq_length")
    context = config.context_length
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < context:
        context = limit
    return replace(config, pooling=pooling, normalize=normalize, context_length=context)
