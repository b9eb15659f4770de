"""Structured output over HTTP with the official clients: ollama ``format``, OpenAI
``response_format`` (and ``parse()`` into a Pydantic model), vLLM's ``guided_*``; a live server
on a tiny random-weight model, whose constrained output must still validate."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import ollama
import openai
import pydantic
import pytest
from live_server import Server

MESSAGES = [{"role": "user", "content": "Describe a pet."}]

# Bounded strings and numbers: a random model would not close an unbounded string in time.
PET = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 5},
        "kind": {"enum": ["cat", "dog"]},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8},
        "toys": {"type": "array", "items": {"enum": ["ball", "rope"]}, "maxItems": 2},
        "vet": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "legs", "toys", "vet"],
    "additionalProperties": False,
}


class Vet(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    ok: bool


class Pet(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=5)
    kind: Literal["cat", "dog"]
    legs: int = pydantic.Field(ge=0, le=8)
    vet: Vet


@pytest.fixture
def oai(tiny_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def oll(tiny_server: Server) -> ollama.Client:
    return ollama.Client(host=tiny_server.url, timeout=60)


def test_ollama_format_schema_chat_and_generate(oll: ollama.Client) -> None:
    opts = {"temperature": 0.9, "seed": 4, "num_predict": 300}
    r = oll.chat(model="tiny", messages=MESSAGES, format=PET, options=opts)
    assert r.done_reason == "stop"
    jsonschema.validate(json.loads(r.message.content), PET)
    g = oll.generate(model="tiny", prompt="A pet:", format=PET, options=opts)
    assert g.done_reason == "stop"
    jsonschema.validate(json.loads(g.response), PET)


def test_ollama_format_json_streamed(oll: ollama.Client) -> None:
    parts = list(
        oll.chat(
            model="tiny",
            messages=MESSAGES,
            format="json",
            stream=True,
            options={"temperature": 0, "num_predict": 400},
        )
    )
    text = "".join(p.message.content for p in parts)
    assert parts[-1].done
    if parts[-1].done_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # any object may run long on random weights; what there is must start one
        assert parts[-1].done_reason == "length" and text.startswith("{")


def test_openai_json_schema_and_parse(oai: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    r = oai.chat.completions.create(
        model="tiny", messages=MESSAGES, response_format=rf, max_tokens=300, temperature=0.8, seed=1
    )
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PET)
    parsed = oai.chat.completions.parse(
        model="tiny", messages=MESSAGES, response_format=Pet, max_tokens=300, temperature=0.8, seed=2
    )
    pet = parsed.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog") and 0 <= pet.legs <= 8


def test_openai_guided_regex_choice_and_completions(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=20, extra_body={"guided_regex": r"[a-c]{2}-[0-9]{2}"}
    )
    assert re.fullmatch(r"[a-c]{2}-[0-9]{2}", r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"
    c = oai.completions.create(
        model="tiny", prompt="Pick:", max_tokens=20, extra_body={"guided_choice": ["yes", "no", "maybe"]}
    )
    assert c.choices[0].text in ("yes", "no", "maybe")
    g = oai.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=20,
        extra_body={"guided_grammar": 'root ::= "x" [0-9] [0-9]?'},
    )
    assert re.fullmatch(r"x[0-9]{1,2}", g.choices[0].message.content)


def test_streamed_json_schema_reassembles(oai: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}
    chunks = list(
        oai.chat.completions.create(
            model="tiny", messages=MESSAGES, response_format=rf, max_tokens=300, seed=3, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PET)


def test_length_inside_the_structure(oai: openai.OpenAI) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET}}
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, response_format=rf, max_tokens=4)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 4


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("/api/chat", {"format": {"type": "nonsense"}}, "format", "nonsense"),
        ("/api/chat", {"format": "yaml"}, "format", "json"),
        (
            "/v1/chat/completions",
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"$ref": "#/a"}},
                }
            },
            "response_format",
            "/a",
        ),
        ("/v1/chat/completions", {"guided_regex": "(ab"}, "response_format", "unclosed"),
        ("/v1/chat/completions", {"guided_grammar": "start: nope"}, "response_format", "nope"),
        ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "xml"),
        ("/v1/chat/completions", {"guided_regex": "a", "guided_json": {}}, "guided_json", "one"),
    ],
)
def test_bad_grammars_are_400_naming_the_problem(
    tiny_server: Server, path: str, body: dict, param: str, words: str
) -> None:
    r = httpx.post(
        tiny_server.url + path, json={"model": "tiny", "messages": MESSAGES, "stream": False, **body}
    )
    assert r.status_code == 400, r.text
    assert words in r.text and param in r.text, r.text


def test_mask_cost_in_metrics(tiny_server: Server, oai: openai.OpenAI) -> None:
    oai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, extra_body={"guided_regex": "[ab]{4}"}
    )
    text = httpx.get(tiny_server.url + "/metrics", timeout=10).text
    values = {  # one series per loaded model: `name{model="tiny:latest"} value`
        line.split()[0].split("{")[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("tandem_grammar")
    }
    assert values["tandem_grammar_masked_rows_total"] >= 5  # 4 letters and the EOS
    assert values["tandem_grammar_mask_seconds_total"] > 0
