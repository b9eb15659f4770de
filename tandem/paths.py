"""Where tandem (and the ollama store it can read) keep files. The only place that reads TANDEM_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def tandem_home() -> Path:
    """Root of the model cache and runtime state: $TANDEM_HOME, default ~/.cache/tandem."""
    env = os.environ.get("TANDEM_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tandem"


def models_dir() -> Path:
    return tandem_home() / "models"


def ollama_models_dir() -> Path:
    """Where ollama keeps its manifests and blobs: $OLLAMA_MODELS, default ~/.ollama/models."""
    env = os.environ.get("OLLAMA_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"
