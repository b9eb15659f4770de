"""Read what the CPU-side processes need from a model file (config, tokenizer), without torch.

One header parse serves both: the scheduler needs the tokenizer and the context length, the
gateway and `tandem tokenize` only the tokenizer. The file is validated on the way (model_check),
so an engine never starts on a file its worker would fail to load.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from tandem.errors import ModelFileError
from tandem.formats.gguf_file import GGUFFile
from tandem.formats.model_check import gguf_config, safetensors_config
from tandem.formats.model_config import ModelConfig
from tandem.tokenizer.build import TokenizerError
from tandem.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if p.is_dir():
        return _tokenizer(p, lambda: Tokenizer.from_hf_dir(p))
    return _tokenizer(p, lambda: Tokenizer.from_gguf(p))


def read_config_and_tokenizer(path: str | Path) -> tuple[ModelConfig, Tokenizer]:
    """The model's config and tokenizer; ModelFileError if the file is not fit to load."""
    p = Path(path)
    if p.is_dir():
        return safetensors_config(p), _tokenizer(p, lambda: Tokenizer.from_hf_dir(p))
    gf = GGUFFile(p)
    return gguf_config(gf), _tokenizer(p, lambda: Tokenizer.from_gguf_metadata(gf.metadata))


def _tokenizer(path: Path, build: Callable[[], Tokenizer]) -> Tokenizer:
    try:
        return build()
    except (ModelFileError, OSError):
        raise
    except TokenizerError as e:
        raise ModelFileError(path, f"its tokenizer cannot be built: {e}") from None
    except Exception:
        # The vocabulary is the file's own data (the tokenizers library raises plain Exception for a
        # bad tokenizer.json): whatever breaks on it is a bad file, said without quoting it. The
        # traceback stays in the debug log in case it is ours.
        log.debug("building the tokenizer of %s failed", path, exc_info=True)
        raise ModelFileError(path, "its tokenizer data is malformed") from None
