"""Chat templates render exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tandem.prompts.chat_template import CHATML_TEMPLATE, ChatTemplateError, render_chat
from tandem.tokenizer.tokenizer import Tokenizer

CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Hello!"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke\nwith two lines.  "},
    ],
    "unicode_and_specials": [
        {"role": "user", "content": "Ünïcödé 中文 😀 and a literal <|im_end|> inside"},
    ],
}

# Templates in the styles models ship, using the features transformers provides.
LLAMA3_STYLE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "Today is " + strftime_now("%Y") %}\n'
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" + system_message + "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
# Plain block tags on their own lines: the output depends on trim_blocks / lstrip_blocks.
TRIM_STYLE = (
    "{% for message in messages %}\n"
    "    {% if message['role'] == 'system' %}\n"
    "[SYS] {{ message['content'] }}\n"
    "    {% else %}\n"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "assistant:\n"
    "{% endif %}"
)
FEATURES = (
    "{% set ns = namespace(count=0) %}"
    "{% for message in messages %}"
    "  {% if message.role == 'system' %}{% continue %}{% endif %}"
    "  {% set ns.count = ns.count + 1 %}"
    "  {{ ns.count }}:{{ message | tojson }}\n"
    "  {% if loop.index > 10 %}{% break %}{% endif %}"
    "{% endfor %}"
    "{% if tools is not none %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% generation %}{{ eos_token }}{% endgeneration %}"
)


@pytest.fixture(scope="module")
def transformers_tokenizer_factory() -> Any:
    """transformers' apply_chat_template on a given template and special tokens."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    def make(template: str, bos: str = "<s>", eos: str = "</s>") -> Any:
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=HFTokenizer(models.BPE()), chat_template=template, bos_token=bos, eos_token=eos
        )

    return make


@pytest.fixture(scope="module")
def smol(default_model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_model_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_model_matches_transformers(
    smol: Tokenizer, transformers_tokenizer_factory: Any, name: str, add_generation_prompt: bool
) -> None:
    bos, eos = smol.id_to_piece(smol.bos_id), smol.id_to_piece(smol.eos_id)
    assert smol.chat_template
    ref = transformers_tokenizer_factory(smol.chat_template, bos, eos)
    messages = CONVERSATIONS[name]
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = render_chat(smol.chat_template, messages, add_generation_prompt, bos_token=bos, eos_token=eos)
    assert got == expected


@pytest.mark.slow
def test_default_model_prompt_text(smol: Tokenizer) -> None:
    got = render_chat(smol.chat_template, CONVERSATIONS["user_only"])
    assert got == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = smol.encode(got)
    assert ids[0] == 1 and ids.count(2) == 2  # control tokens parsed from the rendered prompt


@pytest.mark.parametrize(
    "template",
    [LLAMA3_STYLE, TRIM_STYLE, FEATURES, CHATML_TEMPLATE],
    ids=["llama3", "trim", "features", "chatml"],
)
@pytest.mark.parametrize("name", ["system_user", "multi_turn", "unicode_and_specials"])
def test_template_features_match_transformers(
    transformers_tokenizer_factory: Any, template: str, name: str
) -> None:
    ref = transformers_tokenizer_factory(template, "<|begin_of_text|>", "<|eot_id|>")
    messages = CONVERSATIONS[name]
    tools = (
        [{"type": "function", "function": {"name": "f", "description": "<é>"}}]
        if template is FEATURES
        else None
    )
    expected = ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    got = render_chat(
        template, messages, True, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", tools=tools
    )
    assert got == expected


def test_missing_template_falls_back_to_chatml() -> None:
    assert render_chat(None, CONVERSATIONS["user_only"]) == (
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat("", CONVERSATIONS["user_only"], add_generation_prompt=False) == (
        "<|im_start|>user\nHello!<|im_end|>\n"
    )


def test_raise_exception_becomes_chat_template_error() -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="must alternate"):
        render_chat(LLAMA3_STYLE, bad)


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}",  # syntax error
        "{{ messages[0].content + 1 }}",  # type error at render time
        "{{ ''.__class__.__mro__ }}",  # sandbox
        "{% set ns = namespace(_secret=1) %}",
    ],
)
def test_template_errors(template: str) -> None:
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "x"}])


def test_none_fields_are_dropped() -> None:
    template = "{% for m in messages %}{{ m.role }}:{{ 'content' in m }}{% endfor %}"
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert render_chat(template, messages) == "assistant:False"
