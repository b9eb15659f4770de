"""A tiny random BERT saved as a sentence-transformers folder, for fast embedding tests.

transformers' BertModel writes the weights and config.json; the `tokenizers` library trains a
small WordPiece vocabulary (with BERT's normalizer, pre-tokenizer and [CLS]/[SEP] template);
modules.json and 1_Pooling/config.json say mean pooling, normalized unless asked otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "embeddings map text to vectors of numbers",
    "a small model for fast tests of the pipeline",
    "hello world, this is tandem serving embeddings",
    "retrieval augmented generation needs good vectors",
]


def write_tiny_bert(folder: Path, normalize: bool = True, seed: int = 0, max_seq_length: int = 64) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.save(str(folder / "tokenizer.json"))
    config = {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 128}
    config.update(
        cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # random LayerNorm affine parameters too, so the test sees them used
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(folder), safe_serialization=True)

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": 32,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_cls_token": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return folder


def write_tiny_bert_gguf(folder: Path, path: Path, pooling_type: int = 1) -> Path:
    """The folder as llama.cpp's convert_hf_to_gguf.py writes a BERT: gguf-py's own tensor-name
    map, the WordPiece vocab in "phantom space" spelling (a word-initial piece gets U+2581, a
    continuation loses "##", [SPECIAL] stays), `bert.pooling_type` (1 mean, 2 cls, 3 last)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "config.json").read_text())
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    hf_tokens = sorted(vocab, key=vocab.__getitem__)
    specials = {t["content"] for t in spec["added_tokens"] if t["special"]}

    def phantom(t: str) -> str:
        if t.startswith("[") and t.endswith("]"):
            return t
        return t[2:] if t.startswith("##") else "\u2581" + t

    w = gguf.GGUFWriter(str(path), "bert")
    w.add_name("tiny-bert")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_uint32(gguf.Keys.LLM.POOLING_TYPE.format(arch="bert"), pooling_type)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list([phantom(t) for t in hf_tokens])
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    w.add_token_types([int(control if t in specials else normal) for t in hf_tokens])
    w.add_token_type_count(cfg["type_vocab_size"])
    # As the converter: gguf-py reads the special tokens from the folder (CLS is written as BOS).
    gguf.SpecialVocab(folder, load_merges=False, n_vocab=len(hf_tokens)).add_to_gguf(w, quiet=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, cfg["num_hidden_layers"])
    for hf_name, t in load_file(str(folder / "model.safetensors")).items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:  # position_ids and the like
            continue
        w.add_tensor(name, t.astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
