"""/v1/responses (openai's `responses.create`, streamed and not, `previous_response_id`), vLLM's
/tokenize and /detokenize, and /api/version, against a real `tandem serve` on the tiny model."""

from __future__ import annotations

import openai
import pytest
from live_server import Server

from tandem.prompts.build import chat_ids


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_response_not_streamed_has_text_and_exact_usage(client: openai.OpenAI, tiny_tokenizer) -> None:
    r = client.responses.create(
        model="tiny", input="Hello there", instructions="Be terse.", max_output_tokens=6, temperature=0
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert isinstance(r.output_text, str)
    prompt = chat_ids(
        tiny_tokenizer,
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}],
    )
    assert r.usage.input_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.usage.output_tokens == 6:  # cut by max_output_tokens
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    else:
        assert r.status == "completed"


def test_response_stream_events_reassemble_the_same_text(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "input": "Tell me a story", "max_output_tokens": 12, "temperature": 0}
    whole = client.responses.create(**kw)
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, tiny_tokenizer) -> None:
    first = client.responses.create(model="tiny", input="Hi", max_output_tokens=4, temperature=0)
    second = client.responses.create(
        model="tiny", input="And then?", previous_response_id=first.id, max_output_tokens=4, temperature=0
    )
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"},
    ]
    assert second.usage.input_tokens == len(chat_ids(tiny_tokenizer, chat))
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="tiny", input="x", previous_response_id="resp_unknown")


def test_responses_refuse_what_they_do_not_do(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.responses.create(model="tiny", input="x", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="input"):
        client.responses.create(model="tiny", input=[])
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):  # past the ring's int32
        client.responses.create(model="tiny", input="x", max_output_tokens=2**31)


def test_tokenize_and_detokenize_round_trip(tiny_server: Server, tiny_tokenizer) -> None:
    with tiny_server.client() as c:
        r = c.post("/tokenize", json={"model": "tiny", "prompt": "Hello world"}).json()
        assert r["tokens"] == tiny_tokenizer.encode("Hello world", parse_special=True)
        assert r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
        assert c.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"].endswith("Hello world")
        msgs = [{"role": "user", "content": "Hi"}]
        chat = c.post("/tokenize", json={"messages": msgs}).json()
        assert chat["tokens"] == chat_ids(tiny_tokenizer, msgs)
        both = c.post("/tokenize", json={"prompt": "a", "messages": msgs})
        assert both.status_code == 400 and "exactly one" in both.json()["error"]
        bad = c.post("/detokenize", json={"tokens": [10**9]})
        assert bad.status_code == 400 and "token id" in bad.json()["error"]


def test_version_answers_an_ollama_version_and_tandems_own(tiny_server: Server) -> None:
    from tandem import __version__

    with tiny_server.client() as c:
        v = c.get("/api/version").json()
    major, minor, _ = (int(x) for x in v["version"].split("."))
    assert (major, minor) >= (0, 12) and v["tandem"] == __version__
