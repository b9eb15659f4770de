"""Shared fixtures: the real default model, and tiny random GGUF models for speed."""

from __future__ import annotations

from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2:135m"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need a CUDA device: skipped, and said so, where there is none."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device (benchmarks/gpu_check.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, pulled into the user's cache on first use."""
    from tandem.store.model_store import ensure_model

    return ensure_model(DEFAULT_MODEL).path


@pytest.fixture(scope="session")
def gemma3_model_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF (catalogue gemma3:270m), pulled on first use."""
    from tandem.store.model_store import ensure_model

    return ensure_model("gemma3:270m").path


@pytest.fixture(scope="session")
def hf_model(default_model_path: Path):
    """transformers' own implementation of the default model, from the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    import torch

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT sentence-transformers folder (mean pooling, normalized): tests/tiny_bert.py."""
    from tiny_bert import write_tiny_bert

    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")
