"""The real default model (SmolLM2-135M-Instruct) behind `tandem serve` with no --model, through
both official clients. Its file comes from the user's model cache (pulled there on first use)
and is linked into this test's TANDEM_HOME, so the server finds the default model already pulled.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
from live_server import Server

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Iterator[Server]:
    from tandem.paths import models_dir
    from tandem.store.registry import DEFAULT_MODEL, data_dir, manifest_path

    src_models = models_dir()  # the test process's own store, where default_model_path was pulled
    home = tmp_path_factory.mktemp("default-home")
    dst_models = home / "models"
    manifest = manifest_path(DEFAULT_MODEL)
    rel_manifest = manifest.relative_to(src_models)
    (dst_models / rel_manifest).parent.mkdir(parents=True)
    shutil.copy(manifest, dst_models / rel_manifest)
    rel_data = data_dir(DEFAULT_MODEL).relative_to(src_models)
    (dst_models / rel_data).parent.mkdir(parents=True, exist_ok=True)
    (dst_models / rel_data).symlink_to(data_dir(DEFAULT_MODEL), target_is_directory=True)
    server = Server(home, model=None).start(timeout=300)
    yield server
    assert server.stop() == 0, server.log.read_text()[-3000:]


@pytest.mark.slow
def test_default_model_answers_through_both_clients(default_server: Server) -> None:
    ol = ollama.Client(host=default_server.url, timeout=120)
    ps = ol.ps().models
    assert [m.model for m in ps] == ["smollm2:135m"] and ps[0].context_length == 8192
    r = ol.chat(model="smollm2", messages=QUESTION, options={"temperature": 0, "num_predict": 16})
    assert "paris" in r.message.content.lower(), r.message.content
    assert r.done_reason == "stop"  # it ends its answer itself (<|im_end|>)
    oa = openai.OpenAI(base_url=default_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    c = oa.chat.completions.create(model="smollm2:135m", messages=QUESTION, temperature=0, max_tokens=16)
    assert c.choices[0].message.content == r.message.content  # same greedy answer on both APIs
    assert c.usage.prompt_tokens == r.prompt_eval_count and c.usage.completion_tokens == r.eval_count
