"""ollama's /api/create and /api/copy through the official client, and requests to a derived model
getting its defaults (system prompt, parameters, opening messages, template) on every route,
against a real `tandem serve` on the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ollama
import openai
import pytest
from live_server import Server, tiny_home

from tandem.prompts.build import chat_ids

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    srv = Server(tiny_home(tmp_path_factory, tiny_gguf)).start()
    yield srv
    assert srv.stop() == 0, srv.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def client(server: Server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=30)


def test_create_copy_list_show_delete(client: ollama.Client) -> None:
    r = client.create(
        model="pirate",
        from_="tiny",
        system="You are a pirate.",
        parameters={"temperature": 0.0, "num_predict": 3, "stop": ["\n\n"]},
        messages=[{"role": "user", "content": "Ahoy"}, {"role": "assistant", "content": "Arr"}],
    )
    assert r.status == "success"
    assert client.copy("pirate", "corsair").status == "success"
    names = {m.model for m in client.list().models}
    assert {"tiny:latest", "pirate:latest", "corsair:latest"} <= names
    shown = client.show("corsair")
    assert "FROM tiny:latest" in shown.modelfile and 'SYSTEM """You are a pirate."""' in shown.modelfile
    assert "temperature 0.0" in shown.parameters and "num_predict 3" in shown.parameters
    client.delete("corsair")
    assert "corsair:latest" not in {m.model for m in client.list().models}


def test_a_derived_models_defaults_apply_and_the_request_overrides_them(
    client: ollama.Client, tiny_tokenizer
) -> None:
    client.create(
        model="sailor", from_="tiny", system="You sail.", parameters={"num_predict": 3, "temperature": 0}
    )
    r = client.chat(model="sailor", messages=[{"role": "user", "content": "Hi"}])
    expect = [{"role": "system", "content": "You sail."}, {"role": "user", "content": "Hi"}]
    assert r.prompt_eval_count == len(chat_ids(tiny_tokenizer, expect))
    assert r.eval_count <= 3  # num_predict from the model
    longer = client.chat(
        model="sailor",
        messages=[{"role": "user", "content": "Hi"}],
        options={"num_predict": 7, "ignore_eos": True},
    )
    assert longer.eval_count == 7  # the request's own option wins
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert client.chat(model="sailor", messages=own).prompt_eval_count == len(chat_ids(tiny_tokenizer, own))
    g = client.generate(model="sailor", prompt="Hi")
    assert g.prompt_eval_count == len(chat_ids(tiny_tokenizer, expect))


def test_a_derived_template_and_messages_reach_the_prompt(
    server: Server, client: ollama.Client, tiny_tokenizer
) -> None:
    client.create(
        model="templated",
        from_="tiny",
        template=TEMPLATE,
        messages=[{"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"}],
    )
    r = client.chat(
        model="templated", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 1}
    )
    chat = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply"},
        {"role": "user", "content": "Hi"},
    ]
    assert r.prompt_eval_count == len(chat_ids(tiny_tokenizer, chat, template=TEMPLATE))
    assert chat_ids(tiny_tokenizer, chat, template=TEMPLATE) != chat_ids(tiny_tokenizer, chat)
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=30)
    c = oa.chat.completions.create(
        model="templated", messages=[{"role": "user", "content": "Hi"}], max_tokens=1
    )
    assert c.usage.prompt_tokens == r.prompt_eval_count


def test_create_errors_name_what_was_wrong(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.create(model="x", from_="no-such-model")
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError, match="unknown parameter 'mirostat'"):
        client.create(model="x", from_="tiny", parameters={"mirostat": 1})
    with pytest.raises(ollama.ResponseError, match="files"):
        client.create(model="x", files={"model.gguf": "sha256:00"})
    with pytest.raises(ollama.ResponseError, match="already exists"):
        client.create(model="tiny", from_="tiny")
    with pytest.raises(ollama.ResponseError) as e:
        client.copy("no-such-model", "y")
    assert e.value.status_code == 404
