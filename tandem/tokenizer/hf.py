"""Build a `Tokenizer` from a Hugging Face tokenizer folder (tokenizer.json and its config files).

The `tokenizers` backend is loaded as the folder describes it; what this module adds is what
`Tokenizer` needs beyond it: each id's decoded bytes, token types, BOS/EOS flags, the
end-of-generation set and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import TokenType
from tokenizers import Tokenizer as HFTokenizer

from tandem.tokenizer.special_tokens import _SPECIAL_TYPES, _detect_eog
from tandem.tokenizer.vocab_spelling import _BYTE_TOKEN, SPM_SPACE, _byte_level_bytes

if TYPE_CHECKING:  # tokenizer.py imports this module; the name is only needed for the hints
    from tandem.tokenizer.tokenizer import Tokenizer


def tokenizer_from_hf_dir(cls: type[Tokenizer], path: str | Path) -> Tokenizer:
    """The body of `Tokenizer.from_hf_dir`; takes `cls` so a subclass's classmethod builds a subclass."""
    path = Path(path)
    backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
    # Sentence-transformers files ship with fixed padding and truncation (all-minilm: 128 tokens);
    # prompts are never padded here, and a prompt too long is refused or cut by its route.
    backend.no_padding()
    backend.no_truncation()
    config = _read_json(path / "tokenizer_config.json")
    spec = json.loads(backend.to_str())

    vocab = backend.get_vocab(with_added_tokens=True)
    n = max(vocab.values()) + 1
    tokens = [f"[EMPTY_{i}]" for i in range(n)]
    for text, i in vocab.items():
        tokens[i] = text
    types = [int(TokenType.NORMAL)] * n
    byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))
    if byte_fallback:
        for i, text in enumerate(tokens):
            if _BYTE_TOKEN.fullmatch(text):
                types[i] = TokenType.BYTE
    for i, added in backend.get_added_tokens_decoder().items():
        types[i] = TokenType.CONTROL if added.special else TokenType.USER_DEFINED

    decoder_types = _decoder_types(spec.get("decoder"))
    byte_level = "ByteLevel" in decoder_types
    spm_like = (
        "Metaspace" in decoder_types
        or "ByteFallback" in decoder_types
        or _replaces_spm_space(spec.get("decoder"))
    )
    pieces = []
    for i, (text, ttype) in enumerate(zip(tokens, types, strict=True)):
        if ttype in _SPECIAL_TYPES:
            pieces.append(text.encode("utf-8"))
        elif ttype == TokenType.BYTE:
            pieces.append(bytes([int(text[3:5], 16)]))
        elif byte_level:
            pieces.append(_byte_level_bytes(text))
        elif spm_like:
            pieces.append(text.replace(SPM_SPACE, " ").encode("utf-8"))
        else:
            # WordPiece and other decoders join pieces non-locally; per-token text is the best we have.
            pieces.append(backend.decode([i], skip_special_tokens=False).encode("utf-8"))

    def token_id(value: Any) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if isinstance(value, str) else None

    bos_id = token_id(config.get("bos_token"))
    eos_id = token_id(config.get("eos_token"))
    if bos_id is None and eos_id is None:
        # BERT: the post-processor frames every input as [CLS] ... [SEP]; they play BOS and EOS.
        bos_id, eos_id = token_id(config.get("cls_token")), token_id(config.get("sep_token"))
    pad_id = token_id(config.get("pad_token"))
    unk_id = token_id(config.get("unk_token"))
    gen_config = _read_json(path / "generation_config.json")
    extra_eos = gen_config.get("eos_token_id")
    extra_eos = [extra_eos] if isinstance(extra_eos, int) else list(extra_eos or [])
    eos_ids = _detect_eog({}, tokens, types, eos_id) | {i for i in extra_eos if 0 <= i < n}

    add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
    if add_bos is None or add_eos is None:
        # Llama 3 style files add BOS through the post-processor rather than a config flag.
        with_special = backend.encode("a", add_special_tokens=True).ids
        plain = backend.encode("a", add_special_tokens=False).ids
        if add_bos is None:
            add_bos = bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id
        if add_eos is None:
            add_eos = eos_id is not None and len(with_special) > len(plain) and with_special[-1] == eos_id

    strip = _strips_leading_space(spec)
    return cls(
        backend=backend,
        tokens=tokens,
        token_types=types,
        piece_bytes=pieces,
        bos_id=bos_id,
        eos_id=eos_id,
        eos_ids=eos_ids,
        pad_id=pad_id,
        unk_id=unk_id,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        strip_leading_space=strip,
        chat_template=_hf_chat_template(path, config),
        model="hf",
        pre="hf",
    )


# --- Hugging Face folder helpers ----------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _decoder_types(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    out = {decoder.get("type", "")}
    for child in decoder.get("decoders") or []:
        out |= _decoder_types(child)
    return out


def _replaces_spm_space(decoder: dict[str, Any] | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Replace" and (decoder.get("pattern") or {}).get("String") == SPM_SPACE:
        return True
    return any(_replaces_spm_space(child) for child in decoder.get("decoders") or [])


def _strips_leading_space(spec: dict[str, Any]) -> bool:
    def walk(dec: dict[str, Any] | None) -> bool:
        if not dec:
            return False
        if dec.get("type") == "Strip" and dec.get("content") == " " and int(dec.get("start", 0)) > 0:
            return True
        if dec.get("type") == "Metaspace":
            return dec.get("prepend_scheme", "always") != "never" and dec.get("add_prefix_space", True)
        return any(walk(child) for child in dec.get("decoders") or [])

    return walk(spec.get("decoder"))


def _hf_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(path / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None
