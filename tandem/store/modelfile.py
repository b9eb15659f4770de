"""Derived models: ollama's Modelfile subset, and the defaults a derived model adds to its base.

A derived model (`tandem create`, `/api/create`) shares its base's weights file and adds a
system prompt, sampling parameters, a chat template and opening messages; requests that name it
get those as defaults, which their own fields override. Supported instructions:

    FROM <model>                     a model in the store (required; a derived one is flattened)
    SYSTEM <text>                    the system message when a request brings none
    PARAMETER <name> <value>         one per line; `stop` may repeat
    TEMPLATE <text>                  a Jinja chat template (as in GGUF files), not Go's syntax
    MESSAGE <role> <text>            messages put before the request's own (user/assistant/system)
    LICENSE <text>                   kept, shown by `show`

Text is a bare rest of line, a "quoted string" or a \"\"\"triple-quoted block\"\"\" over lines.
`ADAPTER` and anything else is refused, naming the line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from tandem.errors import ModelStoreError


class ModelfileError(ModelStoreError):
    """A Modelfile (or /api/create body) that cannot be used; names the line or field."""


# ollama's PARAMETER names that tandem's sampling understands, with their value types.
PARAMETER_TYPES: dict[str, type] = {
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "min_p": float,
    "repeat_penalty": float,
    "repeat_last_n": int,
    "presence_penalty": float,
    "frequency_penalty": float,
    "seed": int,
    "num_predict": int,
    "num_ctx": int,
    "stop": str,
}
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ModelDefaults:
    base: str  # the model whose weights file it uses (never itself a derived one)
    system: str | None = None
    template: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # `stop` is a list
    messages: tuple[dict[str, str], ...] = ()
    license: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"messages": list(self.messages)}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> ModelDefaults:
        return cls(
            base=str(body["base"]),
            system=body.get("system"),
            template=body.get("template"),
            parameters=check_parameters(body.get("parameters") or {}),
            messages=check_messages(body.get("messages") or []),
            license=body.get("license"),
        )

    def over(self, base: ModelDefaults) -> ModelDefaults:
        """These defaults on top of a derived base's own: FROM a derived model flattens."""
        return ModelDefaults(
            base=base.base,
            system=self.system if self.system is not None else base.system,
            template=self.template if self.template is not None else base.template,
            parameters=base.parameters | self.parameters,
            messages=self.messages or base.messages,
            license=self.license if self.license is not None else base.license,
        )

    def modelfile(self) -> str:
        """The Modelfile that would create this model again (what `show` prints)."""
        lines = [f"FROM {self.base}"]
        if self.system is not None:
            lines.append(f'SYSTEM """{self.system}"""')
        if self.template is not None:
            lines.append(f'TEMPLATE """{self.template}"""')
        for name, value in self.parameters.items():
            for v in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {name} {json.dumps(v) if isinstance(v, str) else v}")
        lines += [f'MESSAGE {m["role"]} """{m["content"]}"""' for m in self.messages]
        if self.license is not None:
            lines.append(f'LICENSE """{self.license}"""')
        return "\n".join(lines) + "\n"


def check_parameters(raw: Any) -> dict[str, Any]:
    """Typed parameters; unknown names and values of the wrong type are refused by name."""
    if not isinstance(raw, dict):
        raise ModelfileError("parameters must be an object of name: value")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        kind = PARAMETER_TYPES.get(name)
        if kind is None:
            known = ", ".join(PARAMETER_TYPES)
            raise ModelfileError(f"unknown parameter {name!r} (tandem knows {known})")
        values = value if isinstance(value, list) and name == "stop" else [value]
        typed = [_typed(name, kind, v) for v in values]
        out[name] = typed if name == "stop" else typed[0]
    return out


def _typed(name: str, kind: type, value: Any) -> Any:
    try:
        if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
            raise ValueError
        if kind is str and not isinstance(value, str):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        what = {int: "an integer", float: "a number", str: "a string"}[kind]
        raise ModelfileError(f"parameter {name!r} takes {what}, got {value!r}") from None


def check_messages(raw: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(raw, list):
        raise ModelfileError("messages must be a list of {role, content}")
    out = []
    for i, m in enumerate(raw):
        if (
            not isinstance(m, dict)
            or m.get("role") not in MESSAGE_ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise ModelfileError(f"messages[{i}] must be {{role: {'|'.join(MESSAGE_ROLES)}, content: text}}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


_INSTRUCTION = re.compile(r"^\s*([A-Za-z]+)(?:\s+|$)")


def parse_modelfile(text: str) -> tuple[str, ModelDefaults]:
    """(FROM's model name, the defaults with base set to it) of a Modelfile."""
    base: str | None = None
    system = template = license_ = None
    params: dict[str, list[Any]] = {}
    messages: list[dict[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _INSTRUCTION.match(line)
        if m is None:
            raise ModelfileError(f"Modelfile line {i}: expected an instruction, got {line.strip()[:60]!r}")
        word, rest = m.group(1).upper(), line[m.end() :]
        start = i
        key = ""
        if word in ("PARAMETER", "MESSAGE"):  # a name or role, then the text
            key, _, rest = rest.strip().partition(" ")
        arg, i = _argument(rest, lines, i)
        if word == "FROM":
            base = arg.strip()
        elif word == "SYSTEM":
            system = arg
        elif word == "TEMPLATE":
            template = arg
        elif word == "LICENSE":
            license_ = arg
        elif word == "PARAMETER":
            params.setdefault(key, []).append(arg)
        elif word == "MESSAGE":
            messages.append({"role": key, "content": arg})
        else:
            raise ModelfileError(f"Modelfile line {start}: {word} is not supported by tandem")
    if not base:
        raise ModelfileError("the Modelfile has no FROM line naming the base model")
    parameters = check_parameters({k: v if k == "stop" else v[-1] for k, v in params.items()})
    return base, ModelDefaults(
        base=base,
        system=system,
        template=template,
        parameters=parameters,
        messages=check_messages(messages),
        license=license_,
    )


def _argument(rest: str, lines: list[str], i: int) -> tuple[str, int]:
    """The instruction's text: a triple-quoted block (maybe over several lines), a quoted string,
    or the line's rest; and the index of the line after it."""
    stripped = rest.strip()
    if not stripped.startswith('"""'):
        return _unquote(stripped), i
    body = stripped[3:]
    chunks = []
    while True:
        end = body.find('"""')
        if end >= 0:
            chunks.append(body[:end])
            return "\n".join(chunks), i
        chunks.append(body)
        if i >= len(lines):
            raise ModelfileError('Modelfile: a """ block is never closed')
        body = lines[i]
        i += 1


def _unquote(s: str) -> str:
    if len(s) >= 2 and s[0] == s[-1] == '"':
        try:
            return str(json.loads(s))
        except ValueError:
            return s[1:-1]
    return s
