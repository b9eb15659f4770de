"""`tandem run [MODEL]`: an interactive chat with a running server, like `ollama run`.

It talks to the server over /api/chat (NDJSON streaming), keeps the conversation here and
sends it whole each turn. Ctrl-C stops the answer being written (and so cancels it on the
server); Ctrl-D or /bye leaves.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from tandem.commands.ps import no_server, server_url, url_option
from tandem.paths import tandem_home

HELP = """Available Commands:
  /set parameter NAME VALUE   Set a parameter (temperature, top_k, top_p, min_p, seed, num_predict,
                              stop, repeat_penalty, presence_penalty, frequency_penalty, num_ctx)
  /set system TEXT            Set the system message
  /set verbose | quiet        Show or hide timings after each answer
  /show info | parameters | system | template
  /clear                      Clear the session context
  /bye                        Exit
  /?, /help                   This help

Use \"\"\" to begin and end a multi-line message."""


def parse_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(text)
    return text


def go_duration(ns: int) -> str:
    """Durations the way `ollama run --verbose` prints them (Go's time.Duration)."""
    s = ns / 1e9
    if s >= 1:
        return f"{s:.6g}s"
    if s >= 1e-3:
        return f"{s * 1e3:.6g}ms"
    return f"{s * 1e6:.6g}µs"


def summary(final: dict[str, Any]) -> str:
    lines = []
    for key, label in (("total_duration", "total duration"), ("load_duration", "load duration")):
        if final.get(key):
            lines.append(f"{label + ':':<22}{go_duration(final[key])}")
    for prefix, label in (("prompt_eval", "prompt eval"), ("eval", "eval")):
        count, dur = final.get(f"{prefix}_count"), final.get(f"{prefix}_duration")
        if count:
            lines.append(f"{label + ' count:':<22}{count} token(s)")
        if dur:
            lines.append(f"{label + ' duration:':<22}{go_duration(dur)}")
            if count:
                lines.append(f"{label + ' rate:':<22}{count / dur * 1e9:.2f} tokens/s")
    return "\n".join(lines)


class Chat:
    def __init__(self, base: str, model: str, system: str | None, verbose: bool) -> None:
        import httpx

        self.client = httpx.Client(base_url=base, timeout=httpx.Timeout(10.0, read=None))
        self.model = model
        self.system = system
        self.verbose = verbose
        self.options: dict[str, Any] = {}
        self.history: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def ask(self, text: str) -> None:
        import httpx

        self.history.append({"role": "user", "content": text})
        body = {"model": self.model, "messages": self.messages(), "stream": True, "options": self.options}
        answer: list[str] = []
        final: dict[str, Any] | None = None
        try:
            with self.client.stream("POST", "/api/chat", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise click.ClickException(_error_text(r.text, r.status_code))
                for line in r.iter_lines():
                    if not line:
                        continue
                    part = json.loads(line)
                    if "error" in part:
                        raise click.ClickException(str(part["error"]))
                    piece = part.get("message", {}).get("content", "")
                    if piece:
                        answer.append(piece)
                        sys.stdout.write(piece)
                        sys.stdout.flush()
                    if part.get("done"):
                        final = part
        except KeyboardInterrupt:
            # Leaving the stream closes the connection, which cancels the request on the server.
            click.echo("")
            self.history.pop()
            return
        except click.ClickException as e:
            self.history.pop()
            click.echo(f"\nError: {e.message}", err=True)
            return
        except httpx.HTTPError as e:  # the server went away mid-answer
            self.history.pop()
            click.echo(f"\nError: lost the server at {self.client.base_url}: {e}", err=True)
            return
        self.history.append({"role": "assistant", "content": "".join(answer)})
        click.echo("\n")
        if self.verbose and final:
            click.echo(summary(final) + "\n", err=True)

    def command(self, line: str) -> bool:
        """Handle a /command; False when the chat should end."""
        words = line.split(maxsplit=3)
        cmd = words[0].lower()
        if cmd in ("/bye", "/exit"):
            return False
        if cmd in ("/?", "/help"):
            click.echo(HELP)
        elif cmd == "/clear":
            self.history.clear()
            click.echo("Cleared session context")
        elif cmd == "/set":
            self._set(line, words)
        elif cmd == "/show":
            self._show(words[1] if len(words) > 1 else "info")
        else:
            click.echo(f"Unknown command '{words[0]}'. Type /? for help")
        return True

    def _set(self, line: str, words: list[str]) -> None:
        what = words[1].lower() if len(words) > 1 else ""
        if what == "parameter" and len(words) == 4:
            name, value = words[2], parse_value(words[3])
            if name == "stop":
                self.options.setdefault("stop", []).append(str(value))
            else:
                self.options[name] = value
            click.echo(f"Set parameter '{name}' to '{words[3]}'")
        elif what == "system" and len(words) > 2:
            self.system = line.split(maxsplit=2)[2].strip().strip('"')
            click.echo("Set system message.")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            click.echo(f"Set '{what}' mode.")
        else:
            click.echo("Usage: /set parameter NAME VALUE | /set system TEXT | /set verbose | /set quiet")

    def _show(self, what: str) -> None:
        if what == "parameters":
            shown = self.options or {}
            click.echo("\n".join(f"{k:<20}{v}" for k, v in shown.items()) or "No parameters set.")
            return
        if what == "system":
            click.echo(self.system or "No system message was specified.")
            return
        r = self.client.post("/api/show", json={"model": self.model})
        if r.status_code != 200:
            click.echo(f"Error: {_error_text(r.text, r.status_code)}", err=True)
            return
        info = r.json()
        if what == "template":
            click.echo(info.get("template") or "No template was specified.")
            return
        d = info.get("details", {})
        mi = info.get("model_info", {})
        arch = mi.get("general.architecture", d.get("family", "?"))
        click.echo(
            f"  Model\n    architecture        {arch}\n"
            f"    parameters          {d.get('parameter_size', '?')}\n"
            f"    context length      {mi.get(f'{arch}.context_length', '?')}\n"
            f"    quantization        {d.get('quantization_level') or '?'}"
        )


def _error_text(body: str, status: int) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        err = json.loads(body)["error"]
        return err["message"] if isinstance(err, dict) else str(err)
    return f"HTTP {status}: {body[:200]}"


def _read_multiline(first: str) -> str:
    if len(first) > 6 and first.endswith('"""'):
        return first[3:-3].strip()
    lines = [first[3:]]
    while True:
        line = input("... ")
        if line.rstrip().endswith('"""'):
            lines.append(line.rstrip()[:-3])
            return "\n".join(lines).strip()
        lines.append(line)


def _setup_readline() -> None:
    try:
        import readline
    except ImportError:  # not on every platform; input() still works without history
        return
    path = tandem_home() / "history"
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def save() -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

    import atexit

    atexit.register(save)


def _loaded_model(client: Any, base: str) -> str:
    import httpx

    try:
        r = client.get("/api/ps")
    except httpx.HTTPError:
        raise no_server(base) from None
    models = r.json().get("models", []) if r.status_code == 200 else []
    if not models:
        raise click.ClickException(f"the server at {base} has no model loaded")
    return models[0]["name"]


@click.command()
@click.argument("model", required=False)
@url_option
@click.option("--system", default=None, help="System message.")
@click.option("--verbose", is_flag=True, help="Show timings after each answer.")
def run(model: str | None, url: str | None, system: str | None, verbose: bool) -> None:
    """Chat with MODEL (default: the one the server has loaded) on a running `tandem serve`."""
    import httpx

    base = server_url(url)
    chat = Chat(base, model or "", system, verbose)
    chat.model = model or _loaded_model(chat.client, base)
    try:  # an empty chat only loads the model: this checks that the server runs it
        probe = chat.client.post("/api/chat", json={"model": chat.model, "messages": []})
    except httpx.HTTPError:
        raise no_server(base) from None
    if probe.status_code != 200:
        raise click.ClickException(_error_text(probe.text, probe.status_code))
    _setup_readline()
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            click.echo("")
            break
        except KeyboardInterrupt:
            click.echo("\nUse Ctrl + d or /bye to exit.")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith('"""'):
            try:
                text = _read_multiline(text)
            except (EOFError, KeyboardInterrupt):
                click.echo("")
                continue
        if text.startswith("/"):
            if not chat.command(text):
                break
            continue
        chat.ask(text)
    chat.client.close()
