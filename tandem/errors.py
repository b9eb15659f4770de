"""What can go wrong with a model: the store's errors and a model file's, one hierarchy.

The store (names, pulls, manifests) and the file readers (GGUF, safetensors, configs) both raise
these, and the front ends map them to HTTP statuses and CLI messages in one place each. Every
message is one line and never quotes a file's bytes (`quoted` makes a string read from a file safe
to show).
"""

from __future__ import annotations

from pathlib import Path


class ModelStoreError(Exception):
    """Base of every model-store failure; str() is one line, fit for `Error: ...`."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ModelNotFoundError(ModelStoreError):
    """No model of that name in the store (or at that path, or in ollama's store)."""


class ModelFileMissingError(ModelNotFoundError):
    """A manifest exists but its file is gone or has the wrong size; a pull repairs it."""


class InvalidModelNameError(ModelStoreError):
    pass


class PullError(ModelStoreError):
    """Downloading or extracting a model failed."""


class ChecksumError(PullError):
    pass


class DiskFullError(PullError):
    """Not enough free space for a pull: found before it starts, or hit while it writes."""


class ModelFileError(ModelStoreError):
    """A model file tandem cannot use: not a regular file, not GGUF, truncated, a corrupt header or tensor
    table, or tensors of the wrong shape. Names the file and the problem, never the file's bytes."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = " ".join(problem.split())

    def __reduce__(self) -> tuple[type[ModelFileError], tuple[str, str]]:
        return type(self), (self.path, self.problem)


def quoted(text: str, limit: int = 64) -> str:
    """A string read from a model file, fit for an error message: printable, short, in quotes."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return repr(clean if len(clean) <= limit else clean[: limit - 3] + "...")


class LocalPathError(ModelStoreError):
    """A local path that a remote client (HTTP) may not use: not inside a folder the operator allowed."""


class UnsupportedModelError(ValueError):
    """The file describes an architecture, tensor type or setting we cannot run."""
