"""Read what the CPU-side processes need from a model file (config, tokenizer), without torch.

One header parse serves both: the scheduler needs the tokenizer and the context length, the
gateway and `tandem tokenize` only the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from tandem.models.config import ModelConfig
from tandem.models.gguf_file import GGUFFile
from tandem.models.model_config import config_from_gguf, config_from_hf
from tandem.models.tokenizer import Tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    return Tokenizer.from_hf_dir(p) if p.is_dir() else Tokenizer.from_gguf(p)


def read_config_and_tokenizer(path: str | Path) -> tuple[ModelConfig, Tokenizer]:
    p = Path(path)
    if p.is_dir():
        return config_from_hf(json.loads((p / "config.json").read_text())), Tokenizer.from_hf_dir(p)
    gf = GGUFFile(p)
    return config_from_gguf(gf.metadata, set(gf.tensors)), Tokenizer.from_gguf_metadata(gf.metadata)
