"""Tool calling without a server: which family a template speaks, how tools and earlier calls
and results are rendered, the forced-call grammar, and the reply parsers (whole and streamed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import llguidance
import pytest

from tandem.formats.tiny import CHATML_TEMPLATE
from tandem.grammar.compile import to_llguidance
from tandem.prompts.chat_template import render_chat
from tandem.tools.family import (
    GENERIC,
    HERMES,
    LLAMA3,
    Tool,
    template_family,
    template_kwargs,
    template_messages,
)
from tandem.tools.grammar import forced_call_grammar
from tandem.tools.parse import ToolStream, parse_reply

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
import tool_templates

WEATHER = Tool(
    "get_weather",
    "Weather in a city",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
)
TIME = Tool("get_time", "The time", {"type": "object", "properties": {}})
NAMES = frozenset({"get_weather", "get_time"})
CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "content": "sunny, 21", "tool_call_id": "c1"},
]
SMOLLM2 = (  # SmolLM2-135M-Instruct's template: no tools section
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render(template: str, tools: list[Tool]) -> str:
    family = template_family(template)
    return render_chat(template, template_messages(CHAT, tools, family), **template_kwargs(tools, family))


def test_families() -> None:
    assert template_family(tool_templates.QWEN25) == HERMES
    assert template_family(tool_templates.LLAMA3) == LLAMA3
    assert template_family(SMOLLM2) == GENERIC and template_family(CHATML_TEMPLATE) == GENERIC
    assert template_family(None) == GENERIC


def test_qwen_renders_tools_calls_and_results() -> None:
    text = render(tool_templates.QWEN25, [WEATHER])
    assert "<tools>\n" + json.dumps(WEATHER.as_openai()) + "\n</tools>" in text
    # OpenAI's arguments string became the object Qwen's tojson writes
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nsunny, 21\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_llama3_renders_tools_calls_and_results() -> None:
    text = render(tool_templates.LLAMA3, [WEATHER])
    assert "Environment: ipython" in text and '"name": "get_weather"' in text
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    assert "<|start_header_id|>ipython<|end_header_id|>" in text


def test_generic_preamble_for_templates_without_tools() -> None:
    text = render(SMOLLM2, [WEATHER])
    assert "You can call these tools" in text and json.dumps(WEATHER.as_openai()) in text
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in text
    assert "Result of tool get_weather:\nsunny, 21" in text
    assert "SmolLM" not in text  # the preamble is the system message now
    plain = render_chat(SMOLLM2, template_messages([CHAT[0]], [], GENERIC))
    assert "You can call" not in plain


@pytest.mark.parametrize("family", [HERMES, LLAMA3, GENERIC])
@pytest.mark.parametrize("tools", [[WEATHER], [WEATHER, TIME]])
def test_forced_grammar_accepts_a_call_that_parses(family: str, tools: list[Tool]) -> None:
    call = {"city": "Oslo", "unit": "c"}
    written = {
        HERMES: '<tool_call>\n{"name":"get_weather","arguments":'
        + json.dumps(call, separators=(",", ":"))
        + "}\n</tool_call>",
        LLAMA3: '{"name":"get_weather","parameters":' + json.dumps(call, separators=(",", ":")) + "}",
        GENERIC: '{"tool_calls":[{"name":"get_weather","arguments":'
        + json.dumps(call, separators=(",", ":"))
        + "}]}",
    }[family]
    kind, text = forced_call_grammar(tools, family)
    grammar = to_llguidance(kind, text)
    assert llguidance.LLMatcher.validate_grammar(grammar, None) == ""
    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()), n_vocab=257)
    m = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert m.consume_tokens(list(written.encode())), m.get_error()
    assert m.is_accepting()
    bad = llguidance.LLMatcher(tok, grammar, log_level=0)  # a missing required argument
    assert not bad.consume_tokens(list(written.replace('"unit":"c"', '"x":1').encode()))
    content, calls = parse_reply(written, family, NAMES)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", call)]
    jsonschema.validate(calls[0].arguments, WEATHER.parameters)


class _Bytes:
    """A byte vocabulary (token i is byte i, 256 is EOS), enough to drive a matcher by hand."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"\xff<eos>"]
    special_token_ids = (256,)

    def __call__(self, s: str) -> list[int]:
        return list(s.encode())


@pytest.mark.parametrize(
    ("family", "text", "calls", "content"),
    [
        (
            HERMES,
            'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
            ["get_time"],
            "Sure.",
        ),
        (
            HERMES,
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "X"}}</tool_call>',
            ["get_time", "get_weather"],
            "",
        ),
        (HERMES, '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', [], None),  # undeclared
        (HERMES, "I would write <tool_call>not json</tool_call> here", [], None),
        (LLAMA3, '<|python_tag|>{"name": "get_time", "parameters": {}}', ["get_time"], ""),
        (LLAMA3, '{"name": "get_weather", "parameters": "{\\"city\\": \\"Rome\\"}"}', ["get_weather"], ""),
        (LLAMA3, 'The call would be {"name": "get_time", "parameters": {}} I think', [], None),  # prose
        (GENERIC, '{"tool_calls": [{"name": "get_time", "arguments": {}}]}', ["get_time"], ""),
        (GENERIC, 'Here: {"tool_calls": [{"name": "get_time", "arguments": {}}]}', [], None),
        (GENERIC, '{"tool_calls": [{"name": "get_time", "arguments": 3}]}', [], None),
        (GENERIC, '{"answer": 4}', [], None),
    ],
)
def test_parsers(family: str, text: str, calls: list[str], content: str | None) -> None:
    got_content, got = parse_reply(text, family, NAMES)
    assert [c.name for c in got] == calls
    assert got_content == (text if content is None else content)
    assert all(c.id.startswith("call_") for c in got) and len({c.id for c in got}) == len(got)
    # Streamed in small pieces: the same content and calls, and no part of a call leaks as text.
    stream = ToolStream(family, NAMES)
    sent = "".join(stream.feed(text[i : i + 3]) for i in range(0, len(text), 3))
    rest, streamed = stream.finish()
    assert [c.name for c in streamed] == calls
    if calls:
        assert "tool_call" not in sent and '"name"' not in sent
        assert (sent + rest).strip() == got_content
    else:
        assert sent + rest == text
