"""Which models embed (ollama's "embedding" capability): every model class can return hidden
states, so the one case without is a file that declares a pooling with no one vector an input
(llama.cpp's `{arch}.pooling_type` 0 none or 4 rank, a reranker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.formats.gguf_file import GGUFFile
from tandem.formats.model_check import gguf_config
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.scheduler.block_manager import BlockManager
from tandem.scheduler.scheduler import AdmissionError, Scheduler, SchedulerLimits


@pytest.mark.parametrize(
    ("pooling_type", "embeds", "pooling"),
    [
        (None, True, ("last", True)),
        (1, True, ("mean", True)),
        (2, True, ("cls", True)),
        (3, True, ("last", True)),
        (0, False, None),
        (4, False, None),
        (7, False, None),
    ],
)
def test_decoder_gguf_pooling_type(tmp_path: Path, pooling_type: int | None, embeds: bool, pooling) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", TinySpec(pooling_type=pooling_type))
    cfg = gguf_config(GGUFFile(path))
    assert cfg.embeds is embeds and not cfg.is_encoder
    if embeds:
        assert cfg.embedding_pooling == pooling


def test_scheduler_refuses_embeddings_of_a_model_that_does_not_embed() -> None:
    limits = SchedulerLimits(4, 16, 8, 64, embeds=False)
    sched = Scheduler(limits, BlockManager(32, 4))
    with pytest.raises(AdmissionError, match="this model does not support embeddings") as e:
        sched.check_embed_feasible(3)
    assert e.value.code == "invalid_request"
    Scheduler(SchedulerLimits(4, 16, 8, 64), BlockManager(32, 4)).check_embed_feasible(3)


def test_capability_names() -> None:
    from tandem.gateway.http.state import model_capabilities

    assert model_capabilities(encoder=False, embeds=True) == ["completion", "embedding"]
    assert model_capabilities(encoder=False, embeds=False) == ["completion"]
    assert model_capabilities(encoder=True, embeds=True) == ["embedding"]


def test_description_carries_the_pooling_type(tmp_path: Path) -> None:
    """/api/show decides a model it has not loaded from this (pooling_type_embeds)."""
    from tandem.formats.model_config import pooling_type_embeds
    from tandem.store.describe import _describe_gguf

    info = _describe_gguf(write_tiny_gguf(tmp_path / "r.gguf", TinySpec(pooling_type=4)))
    assert info["pooling_type"] == 4 and not pooling_type_embeds(4)
    assert _describe_gguf(write_tiny_gguf(tmp_path / "p.gguf"))["pooling_type"] is None
    assert pooling_type_embeds(None) and pooling_type_embeds(1) and not pooling_type_embeds(True)
