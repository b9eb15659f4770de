"""Tool calling through the official ollama and openai clients against live servers, on tiny
random-weight models carrying three kinds of chat template in their GGUF metadata: Qwen2.5's
(``<tool_call>`` blocks), Llama 3.x's (a JSON call as the whole reply) and plain ChatML (no
tools section: tandem's generic preamble). Random weights never choose to call a tool, so a
call is forced (tool_choice required or named, enforced by the grammar) and must still parse
into arguments that follow the declared schema."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import ollama
import openai
import pytest
from live_server import TINY_CONTEXT, Server, tiny_home

from tandem.formats.tiny import CHATML_TEMPLATE, TinySpec, write_tiny_gguf

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
import tool_templates

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER_PARAMS},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Time in a zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["utc", "cet"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
TEMPLATES = {"qwen25": tool_templates.QWEN25, "llama3": tool_templates.LLAMA3, "chatml": CHATML_TEMPLATE}


@pytest.fixture(scope="module", params=list(TEMPLATES))
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    spec = TinySpec(context=TINY_CONTEXT, chat_template=TEMPLATES[request.param])
    gguf = write_tiny_gguf(tmp_path_factory.mktemp("tools") / "tiny.gguf", spec)
    s = Server(tiny_home(tmp_path_factory, gguf)).start()
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


@pytest.fixture
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _check_weather(name: str, arguments: dict) -> None:
    assert name == "get_weather"
    jsonschema.validate(arguments, WEATHER_PARAMS)


def test_openai_named_and_required(oai: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = oai.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200, temperature=0.7, seed=1
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    _check_weather(call.function.name, json.loads(call.function.arguments))  # arguments: a JSON string
    r = oai.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=200,
        temperature=0.7,
        seed=2,
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and r.choices[0].finish_reason == "tool_calls"


def test_openai_auto_and_none_answer_in_text(oai: openai.OpenAI) -> None:
    for choice in ("auto", "none"):
        r = oai.chat.completions.create(
            model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=12, temperature=0
        )
        assert r.choices[0].message.tool_calls is None  # random weights never write a call
        assert r.choices[0].finish_reason in ("length", "stop")
        assert isinstance(r.choices[0].message.content, str)


def test_openai_round_trip_with_a_tool_message(oai: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = oai.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200, seed=3
    )
    msg = first.choices[0].message
    (call,) = msg.tool_calls
    history = [
        *ASK,
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    second = oai.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert second.choices[0].message.role == "assistant"
    # the call and its result are in the prompt: longer than the question and the tools alone
    alone = oai.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + len('{"temp": 21}')


def test_openai_streamed_tool_call_reassembles(oai: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    with oai.chat.completions.stream(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=200, seed=4
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    _check_weather(call.function.name, json.loads(call.function.arguments))
    assert not choice.message.content  # no piece of the call leaked into the text


def test_ollama_forced_call_arguments_are_an_object(server: Server) -> None:
    client = ollama.Client(host=server.url, timeout=60)
    body = {
        "model": "tiny",
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},  # tandem extension
        "stream": False,
        "options": {"num_predict": 200, "seed": 5},
    }
    r = httpx.post(server.url + "/api/chat", json=body, timeout=60).json()
    (call,) = r["message"]["tool_calls"]
    _check_weather(call["function"]["name"], call["function"]["arguments"])
    # the official client: tools in, auto (no call from random weights), a round trip
    resp = client.chat(model="tiny", messages=ASK, tools=TOOLS, options={"num_predict": 8})
    assert resp.message.role == "assistant" and not resp.message.tool_calls
    history = [*ASK, r["message"], {"role": "tool", "content": "21 degrees", "tool_name": "get_weather"}]
    resp = client.chat(model="tiny", messages=history, tools=TOOLS, options={"num_predict": 4})
    assert resp.done
    # streamed: the call arrives whole in one chunk
    body["stream"] = True
    with httpx.stream("POST", server.url + "/api/chat", json=body, timeout=60) as s:
        lines = [json.loads(line) for line in s.iter_lines() if line]
    calls = [c for line in lines for c in line["message"].get("tool_calls", [])]
    assert len(calls) == 1 and lines[-1]["done"]
    _check_weather(calls[0]["function"]["name"], calls[0]["function"]["arguments"])


def test_show_lists_tools(server: Server) -> None:
    r = httpx.post(server.url + "/api/show", json={"model": "tiny"}, timeout=30)
    assert {"completion", "tools"} <= set(r.json()["capabilities"])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in tools"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "retrieval"}]}, "only function tools"),
    ],
)
def test_bad_tools_are_400(server: Server, change: dict, words: str) -> None:
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, **change}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and words in r.text, r.text
