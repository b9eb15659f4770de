"""Render a chat into a prompt string with the model's Jinja chat template.

The environment copies what transformers' `apply_chat_template` gives templates (sandboxed,
`trim_blocks`/`lstrip_blocks`, `loopcontrols`, `raise_exception`, a `tojson` that does not escape
HTML, `strftime_now`, a `{% generation %}` tag), since templates shipped with models are written
and tested against it.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

# transformers' former default template, used by models that ship none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template does not compile, or failed (or refused, via raise_exception) to render this chat."""


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """raise_exception() called by the template itself: its message is meant for the user."""


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body.
    tags = {"generation"}  # noqa: RUF012 - jinja's Extension API declares tags as a class attribute

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # Like transformers: refuse underscore attributes so a template cannot reach CPython internals.
    # First parameter unnamed, as in jinja's Namespace, so that `namespace(self=...)` still works.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} may not start with '_'")


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & for HTML, which would change prompts.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile (line {e.lineno}): {e.message}") from e


def resolve_template(template: str | None) -> str:
    """The model's template, or ChatML when it has none."""
    if template:
        return template
    logger.warning("model has no chat template; using ChatML")
    return CHATML_TEMPLATE


def _clean_message(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
    # transformers drops None values (OpenAI sends content=None next to tool_calls) so that
    # templates' `is defined` tests behave.
    return {k: v for k, v in message.items() if v is not None}


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **kwargs: Any,
) -> str:
    """The prompt text for `messages`.

    Extra kwargs (tools, documents, enable_thinking, ...) are passed to the template.

    Raises ChatTemplateError for a template that fails to compile or render, or that rejects the chat.
    """
    compiled = _compile(resolve_template(template))
    context: dict[str, Any] = {"tools": None, "documents": None, **kwargs}
    try:
        return compiled.render(
            messages=[_clean_message(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **context,
        )
    except ChatTemplateError:
        raise
    except _TemplateRaised as e:
        raise ChatTemplateError(str(e.message)) from e
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        # Templates assume shapes (content is a string, roles alternate); report, don't crash.
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
