"""Which model class runs which architecture (ModelConfig.architecture)."""

from __future__ import annotations

import torch

from tandem.errors import UnsupportedModelError
from tandem.formats.model_config import ModelConfig
from tandem.gpu_worker.model.gemma3 import Gemma3Model
from tandem.gpu_worker.model.llama import LlamaModel, Weight

MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    "llama": LlamaModel,  # also Mistral
    "qwen2": LlamaModel,
    "qwen3": LlamaModel,
    "gemma3": Gemma3Model,
}


def make_model(
    config: ModelConfig, weights: dict[str, Weight], dtype: torch.dtype | None = None
) -> LlamaModel:
    cls = MODEL_CLASSES.get(config.architecture)
    if cls is None:
        raise UnsupportedModelError(f"no model class for architecture {config.architecture!r}")
    return cls(config, weights, dtype)
