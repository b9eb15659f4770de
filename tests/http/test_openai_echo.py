"""Echo on /v1/completions through the openai client: the prompt's tokens with their logprobs in
the legacy shape, equal to transformers' float32 forward of the same tiny GGUF, then the
generated ones; max_tokens 0 answers the prompt alone; streamed chunks add up to the same."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import openai
import pytest
from live_server import Server

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def client(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf.parent), gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    return model.eval()


def _ref_rows(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1].numpy()


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 250) for _ in range(n)]


def test_echo_prompt_logprobs_equal_the_reference(client, reference, tiny_tokenizer) -> None:
    prompt = _prompt(1, 40)
    r = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    c = r.choices[0]
    assert c.text == tiny_tokenizer.decode(prompt) and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == len(prompt) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = _ref_rows(reference, prompt)
    want = rows[np.arange(len(prompt) - 1), prompt[1:]]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=1e-4)
    for row, tops in zip(rows, lp.top_logprobs[1:], strict=True):
        # keyed by token text: two byte tokens that decode alike (U+FFFD) share a key
        assert 1 <= len(tops) <= 2
        np.testing.assert_allclose(max(tops.values()), row.max(), atol=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_echo_then_generation_and_streamed_alike(client, tiny_tokenizer) -> None:
    prompt = _prompt(2, 12)
    kw = {"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 4, "temperature": 0}
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    whole = client.completions.create(**kw)
    c = whole.choices[0]
    assert c.text == tiny_tokenizer.decode(prompt) + plain.choices[0].text
    assert len(c.logprobs.tokens) == len(prompt) + whole.usage.completion_tokens
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    streamed = [v for ch in chunks if ch.choices[0].logprobs for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None
    assert all(ch.choices[0].logprobs is None or ch.choices[0].logprobs.tokens for ch in chunks)
    np.testing.assert_allclose(streamed[1:], c.logprobs.token_logprobs[1:], atol=1e-5)


def test_echo_of_a_text_prompt_without_logprobs(client) -> None:
    r = client.completions.create(model="tiny", prompt="hello world", echo=True, max_tokens=0)
    assert r.choices[0].text == "hello world" and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 0


def test_max_tokens_zero_needs_echo(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hello", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"


def test_lm_eval_style_batched_loglikelihood(client, reference) -> None:
    """lm-evaluation-harness's request: token-id prompts in one list, echo, logprobs 1, one token
    generated; it reads token_logprobs[ctxlen:-1] of each choice by index."""
    prompts = [_prompt(3, 10), _prompt(4, 17)]
    r = client.completions.create(
        model="tiny", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1
    )
    assert [c.index for c in r.choices] == [0, 1]
    for c, prompt in zip(r.choices, prompts, strict=True):
        assert len(c.logprobs.token_logprobs) == len(prompt) + 1
        rows = _ref_rows(reference, prompt)
        want = rows[np.arange(len(prompt) - 1), prompt[1:]]
        np.testing.assert_allclose(c.logprobs.token_logprobs[1:-1], want, atol=1e-4)
    assert r.usage.completion_tokens == 2 and r.usage.prompt_tokens == 27
