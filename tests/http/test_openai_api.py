"""The OpenAI API of a real `tandem serve`, driven with the official openai client."""

from __future__ import annotations

import openai
import pytest
from live_server import Server

from tandem.prompts.build import chat_ids

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_chat_not_streamed_usage_exact(client: openai.OpenAI, tiny_tokenizer) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == len(chat_ids(tiny_tokenizer, MESSAGES))
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_streamed_matches_and_counts(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_completion_tokens": 16}
    whole = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    token_lps = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert len(token_lps) == usage.usage.completion_tokens  # one logprob per generated token: exact counts
    for t in token_lps:
        assert (
            t.logprob <= 0
            and len(t.top_logprobs) == 2
            and bytes(t.bytes).decode("utf-8", "replace") == t.token
        )


def test_chat_logprobs_not_streamed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True, extra_body={"ignore_eos": True}
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert all(t.top_logprobs == [] for t in content)


def test_seed_and_stop(client: openai.OpenAI) -> None:
    kw = {"model": "tiny", "messages": MESSAGES, "seed": 3, "temperature": 1.0, "max_tokens": 40}
    a = client.chat.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].message.content
    b = client.chat.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].message.content
    assert a == b
    stop = a[len(a) // 2 : len(a) // 2 + 2]
    r = client.chat.completions.create(**kw, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == a[: a.find(stop)]


def test_completions_streamed_and_not(client: openai.OpenAI, tiny_tokenizer) -> None:
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.usage.prompt_tokens == len(tiny_tokenizer.encode("Once upon a time", parse_special=False))
    parts = list(
        client.completions.create(
            model="tiny",
            prompt="Once upon a time",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(p.choices[0].text for p in parts if p.choices)
    assert text == whole.choices[0].text
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_legacy_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny", prompt="abc", max_tokens=6, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_completions_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt="abc", extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny:latest"]
    assert client.models.retrieve("tiny:latest").id == "tiny:latest"
    assert client.models.retrieve("tiny").owned_by == "tandem"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_errors_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert "model 'gpt-4o' not found" in nf.value.message
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=-0.5)
    assert br.value.body["param"] == "temperature" and br.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as n:
        client.chat.completions.create(model="tiny", messages=MESSAGES, n=0)
    assert n.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as ctx:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
    assert ctx.value.body["code"] == "context_length_exceeded" and "100000" in ctx.value.message
