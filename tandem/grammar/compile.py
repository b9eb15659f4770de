"""A request's grammar (kind + source text) as an llguidance grammar, checked or compiled.

Kinds (SamplingParams.grammar_kind): "json" (any JSON object: ollama's ``format: "json"``,
OpenAI's ``json_object``), "json_schema" (the JSON-schema subset llguidance implements),
"regex", "lark" (llguidance's Lark dialect) and "gbnf" (llama.cpp's GBNF, converted to Lark).
JSON is generated compact (``,`` and ``:`` with no whitespace): a model may not pad it with
whitespace forever.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from threading import Lock

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

log = logging.getLogger(__name__)

_JSON_OPTIONS: dict = {"whitespace_flexible": False}
_ANY_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """A grammar llguidance cannot compile; the message names the problem."""


def to_llguidance(kind: str, text: str) -> str:
    """The llguidance grammar for ``kind``/``text``; raises GrammarError for malformed input."""
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=_JSON_OPTIONS)
        if kind == "json_schema":
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise GrammarError("a JSON schema must be an object (or true/false)")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(text)
        if kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(text)
        if kind == "gbnf":
            return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(text))
    except GrammarError:
        raise
    except Exception as e:  # llguidance raises ValueError or its own errors for bad sources
        raise GrammarError(f"cannot compile the {kind} grammar: {e}") from None
    raise GrammarError(f"unknown grammar kind {kind!r}")


def check(kind: str, text: str, tokenizer: llguidance.LLTokenizer | None) -> None:
    """Raise GrammarError naming the problem unless the grammar compiles for ``tokenizer``."""
    grammar = to_llguidance(kind, text)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise GrammarError(f"invalid {kind.replace('_', ' ')}: {messages[0] if messages else 'rejected'}")
    for m in messages:
        log.debug("grammar warning: %s", m)


class MatcherCache:
    """Compiled matchers by (kind, text), least recently used dropped past ``capacity``; a
    request gets a deep copy of the cached one (copying is far cheaper than compiling)."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, capacity: int = 64) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = Lock()  # compiles run on a background thread; lookups on the step loop

    def compile(self, kind: str, text: str) -> llguidance.LLMatcher:
        key = (kind, text)
        with self._lock:
            m = self._cache.get(key)
            if m is not None:
                self._cache.move_to_end(key)
                return m
        m = llguidance.LLMatcher(self.tokenizer, to_llguidance(kind, text), log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        with self._lock:
            self._cache[key] = m
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return m
