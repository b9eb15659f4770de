"""Which local files a remote client (HTTP) may pull as models.

The CLI's user may name any file they can read. A remote client may name none, unless the operator
allowed folders (`tandem serve --allow-local-models DIR`), and then only a path that is absolute,
has no '..', and still lies inside one of those folders once every symlink is resolved: a regular
file, or a safetensors folder whose files all do. Nothing outside is ever stat()ed or opened, so the
answer for a path outside says nothing about whether it exists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from tandem.errors import LocalPathError
from tandem.formats.file_access import stat_regular
from tandem.store.registry import CATALOGUE

_HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def looks_like_path(ref: str) -> bool:
    """Whether a remote client's model reference is a file path rather than a model name."""
    return ref.startswith(("/", ".", "~")) or ref.endswith((".gguf", ".safetensors")) or "\\" in ref


def allowed_roots(folders: Sequence[str | Path]) -> tuple[Path, ...]:
    """The operator's folders, resolved once (so a later symlink swap of the folder itself is moot)."""
    return tuple(Path(os.path.realpath(Path(f).expanduser())) for f in folders)


def confine(ref: str, roots: Sequence[Path]) -> Path:
    """The resolved path of a remote client's local reference; LocalPathError unless it is allowed."""
    if not roots:
        raise LocalPathError(
            f"{ref!r} is a local path, which HTTP clients cannot pull: name a catalogue model "
            f"({', '.join(CATALOGUE)}), a model ollama has pulled, or hf://owner/repo/file.gguf "
            "(the server's operator can allow a folder with `tandem serve --allow-local-models DIR`)"
        )
    pure = PurePosixPath(ref)
    if not pure.is_absolute():
        raise LocalPathError(f"{ref!r}: give an absolute path inside a folder this server allows")
    if ".." in pure.parts:
        raise LocalPathError(f"{ref!r}: '..' is not allowed in a model path")
    real = Path(os.path.realpath(ref))  # readlink/lstat of its components only: nothing is opened
    root = next((r for r in allowed_roots(roots) if real.is_relative_to(r)), None)
    if root is None:
        raise LocalPathError(f"{ref!r} is not inside a folder this server allows local models from")
    if real.is_dir():
        _check_folder(ref, real, root)
    else:
        stat_regular(real)
    return real


def _check_folder(ref: str, folder: Path, root: Path) -> None:
    # The model's files are read later by whoever loads it: each must stay inside the folder too.
    names = [*_HF_FILES, *(p.name for p in folder.glob("*.safetensors"))]
    for name in names:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        if not Path(os.path.realpath(path)).is_relative_to(root):
            raise LocalPathError(f"{ref!r}: {name} links outside the folders this server allows")
        stat_regular(path)
