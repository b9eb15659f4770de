"""The ollama API of a real `tandem serve`, driven with the official ollama client (0.6.x)."""

from __future__ import annotations

import datetime
from pathlib import Path

import httpx
import ollama
import pytest
from live_server import LONG, TINY_CONTEXT, Server, add_ollama_model

from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.prompts.build import chat_ids, prompt_ids

GREEDY = {"temperature": 0, "num_predict": 24}
LONG_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> ollama.Client:
    return ollama.Client(host=tiny_server.url, timeout=30)


def test_generate_not_streamed(client: ollama.Client, tiny_tokenizer) -> None:
    r = client.generate(model="tiny", prompt="Why is the sky blue?", options={"num_predict": 12, **LONG_EOS})
    assert r.done is True and r.done_reason == "length"
    assert r.eval_count == 12
    assert r.prompt_eval_count == len(prompt_ids(tiny_tokenizer, "Why is the sky blue?"))
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(r, field), int) and getattr(r, field) >= 0, field
    assert r.total_duration >= r.eval_duration
    assert r.context and len(r.context) == r.prompt_eval_count + r.eval_count


def test_generate_streamed_matches_not_streamed(client: ollama.Client) -> None:
    whole = client.generate(model="tiny", prompt="hello", options=GREEDY)
    parts = list(client.generate(model="tiny", prompt="hello", options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].response == "" and parts[-1].eval_count == whole.eval_count
    assert "".join(p.response for p in parts) == whole.response
    assert all(p.model == "tiny" and p.created_at for p in parts)


def test_chat_streamed_and_not(client: ollama.Client, tiny_tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    whole = client.chat(model="tiny:latest", messages=messages, options=GREEDY)
    assert whole.message.role == "assistant" and whole.done
    assert whole.prompt_eval_count == len(chat_ids(tiny_tokenizer, messages))
    parts = list(client.chat(model="tiny:latest", messages=messages, options=GREEDY, stream=True))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert all(p.message.role == "assistant" for p in parts)


def test_seed_reproducible_and_stop_string(client: ollama.Client) -> None:
    opts = {"temperature": 1.0, "seed": 42, "num_predict": 40, "ignore_eos": True}
    a = client.generate(model="tiny", prompt="seed", options=opts).response
    b = client.generate(model="tiny", prompt="seed", options=opts).response
    assert a == b and len(a) > 4
    stop = a[len(a) // 2 : len(a) // 2 + 2]
    r = client.generate(model="tiny", prompt="seed", options={**opts, "stop": [stop]})
    assert r.done_reason == "stop"
    assert r.response == a[: a.find(stop)]


def test_logprobs(client: ollama.Client) -> None:
    r = client.generate(
        model="tiny",
        prompt="x",
        options={"num_predict": 6, "ignore_eos": True},
        logprobs=True,
        top_logprobs=3,
    )
    assert len(r.logprobs) == r.eval_count == 6
    for lp in r.logprobs:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob


def test_empty_prompt_loads(client: ollama.Client) -> None:
    r = client.generate(model="tiny", prompt="")
    assert r.done and r.done_reason == "load"


def test_bad_format_schema_is_a_clear_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="tiny", prompt="x", format={"type": "nonsense"})
    assert e.value.status_code == 400 and "format" in e.value.error


def test_list_show_ps(client: ollama.Client) -> None:
    models = client.list().models
    tiny = next(m for m in models if m.model == "tiny:latest")
    assert isinstance(tiny.modified_at, datetime.datetime) and tiny.size > 0
    assert tiny.details.family == "llama"
    show = client.show("tiny")
    assert show.modelinfo["general.architecture"] == "llama"
    assert show.modelinfo["llama.context_length"] == TINY_CONTEXT
    assert "<|im_start|>" in show.template and show.details.format == "gguf"
    assert f"num_ctx {TINY_CONTEXT}" in show.parameters
    ps = client.ps().models
    assert [m.model for m in ps] == ["tiny:latest"]
    assert ps[0].context_length == TINY_CONTEXT and ps[0].expires_at is not None


def test_pull_other_model_then_it_loads_on_demand_then_delete(
    client: ollama.Client, tiny_server: Server, tmp_path: Path
) -> None:
    other = write_tiny_gguf(tmp_path / "other.gguf", TinySpec(seed=7))
    add_ollama_model(tiny_server.home / "ollama", "other", other.read_bytes())  # as `ollama pull other`
    statuses = [p.status for p in client.pull("other", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "other:latest" in [m.model for m in client.list().models]
    assert client.generate(model="other", prompt="x", options={"num_predict": 2}).done  # loaded for it
    assert {"other:latest", "tiny:latest"} <= {m.model for m in client.ps().models}
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("other")  # loaded
    assert e.value.status_code == 400 and "tandem stop other" in e.value.error
    assert client.generate(model="other", prompt="", keep_alive=0).done_reason == "unload"
    assert client.delete("other").status == "success"
    assert "other:latest" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("other")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="other", prompt="x")
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.delete("tiny")  # the server's own model
    assert e.value.status_code == 400


def test_pull_failure_is_an_error_line(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        list(client.pull("no-such-model", stream=True))
    assert "not found" in e.value.error


def test_root_version_and_head(tiny_server: Server) -> None:
    with tiny_server.client() as c:
        r = c.get("/")
        assert r.status_code == 200 and r.text == "Ollama is running"
        assert c.head("/").status_code == 200
        assert c.get("/api/version").json()["version"]
        assert c.get("/api/generate").status_code == 405


def test_unknown_options_are_ignored(tiny_server: Server) -> None:
    body = {
        "model": "tiny",
        "prompt": "x",
        "stream": False,
        "options": {"num_predict": 2, "mirostat": 1, "made_up": True},
    }
    r = httpx.post(tiny_server.url + "/api/generate", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["eval_count"] <= 2
    assert "invalid option provided: 'made_up'" in tiny_server.log.read_text()


def test_long_generation_reports_length(client: ollama.Client) -> None:
    r = client.generate(model="tiny", prompt="x", options={**LONG, "num_predict": 100})
    assert r.done_reason == "length" and r.eval_count == 100
