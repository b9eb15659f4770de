"""n > 1 and prompt lists through the openai client: one choice per prompt and sample at index
i * n + j, sample j seeded with seed + j, usage summed, streams interleaved per index, and a
client that goes away cancels every choice."""

from __future__ import annotations

import json
from collections import defaultdict

import httpx
import openai
import pytest
from live_server import Server, wait_for

MESSAGES = [{"role": "user", "content": "Tell me a story"}]
FREE = {"temperature": 1.0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_n2_choices_indexed_seeded_and_usage_summed(client) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, seed=11, **FREE)
    assert [c.index for c in r.choices] == [0, 1]
    texts = [c.message.content for c in r.choices]
    assert texts[0] != texts[1]  # seed + j: the samples differ
    for j in range(2):  # and each is the single request with its seed
        one = client.chat.completions.create(model="tiny", messages=MESSAGES, seed=11 + j, **FREE)
        assert one.choices[0].message.content == texts[j]
        assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completions_prompt_list_with_n(client) -> None:
    prompts = ["once upon a time", "the quick brown fox"]
    r = client.completions.create(model="tiny", prompt=prompts, n=2, seed=3, **FREE)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = []
    for i, p in enumerate(prompts):
        for j in range(2):
            one = client.completions.create(model="tiny", prompt=p, seed=3 + j, **FREE)
            assert one.choices[0].text == r.choices[i * 2 + j].text
            singles.append(one)
    assert r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens == singles[0].usage.prompt_tokens + singles[2].usage.prompt_tokens
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 5


def test_streamed_n2_reassembles_per_index(client) -> None:
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, seed=5, **FREE)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            n=2,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
            **FREE,
        )
    )
    text: dict[int, str] = defaultdict(str)
    finishes: dict[int, int] = defaultdict(int)
    for c in chunks[:-1]:
        assert len(c.choices) == 1 and c.usage is None
        ch = c.choices[0]
        text[ch.index] += ch.delta.content or ""
        finishes[ch.index] += ch.finish_reason is not None
    assert dict(text) == {c.index: c.message.content for c in whole.choices}
    assert dict(finishes) == {0: 1, 1: 1}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    streamed = list(client.completions.create(model="tiny", prompt=["a", "b"], stream=True, max_tokens=3))
    assert {c.choices[0].index for c in streamed} == {0, 1}


def test_disconnect_cancels_every_choice(tiny_server: Server) -> None:
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "stream": True,
        "n": 3,
        "max_tokens": 3000,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=tiny_server.url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            assert tiny_server.ps()["running"] == 3
        wait_for(lambda: (p := tiny_server.ps())["running"] == 0 and p["kv_blocks_used"] == 0, timeout=2.0)
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={**body, "stream": False, "prompt": ["a", "b"]}, timeout=0.5)
        wait_for(lambda: (p := tiny_server.ps())["running"] == 0 and p["kv_blocks_used"] == 0, timeout=2.0)


def test_a_refused_prompt_refuses_the_whole_list(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=["fine", "x" * 20000], n=2, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded"


def test_n2_with_a_json_schema_constrains_every_choice(client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "kind": {"enum": ["cat", "dog"]},
            "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        },
        "required": ["kind", "legs"],
        "additionalProperties": False,
    }
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=3, response_format=rf, max_tokens=100, temperature=0.8, seed=4
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.finish_reason == "stop"
        value = json.loads(c.message.content)
        assert value["kind"] in ("cat", "dog") and 0 <= value["legs"] <= 8
