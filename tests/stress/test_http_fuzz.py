"""Input a hostile or careless HTTP client sends, against a throwaway `tandem serve` on the tiny
model: every string checked where the body is parsed, a 400 that names the field, and never a 500
or a hang on any route, for bodies hypothesis draws (every route, ollama, OpenAI, /v1/responses,
/tokenize, /api/embed...) and for requests schemathesis generates from the server's own
/openapi.json. Each request has a bounded timeout: running past it is the hang.

CI-bounded: 15 hypothesis bodies per route and 12 schemathesis cases per operation, times
TANDEM_STRESS_SCALE. The server may delete or overwrite its own models meanwhile (/api/delete,
/api/create, /api/copy): it is this module's alone, offline (no pip index, no Hugging Face).

Run: python -m pytest tests/stress/test_http_fuzz.py -q
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from live_server import TINY_CONTEXT, Server, tiny_home
from schemathesis.checks import not_a_server_error

from tandem.formats.tiny import TinySpec, write_tiny_gguf

SCALE = float(os.environ.get("TANDEM_STRESS_SCALE", "1"))
ROUTE_EXAMPLES = max(1, int(15 * SCALE))  # hypothesis bodies per route
SCHEMA_EXAMPLES = max(1, int(12 * SCALE))  # schemathesis cases per operation
TIMEOUT_S = 30  # a refusal or a 3-token generation takes well under a second


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    gguf = write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", TinySpec(context=TINY_CONTEXT))
    empty = tmp_path_factory.mktemp("no-index")
    server = Server(tiny_home(tmp_path_factory, gguf), args=("--allowed-host", "tandem.example"))
    # Offline: a fuzzed name must never start a download.
    server.env |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "HF_HUB_OFFLINE": "1"}
    server.start()
    yield server
    print(f"http fuzz: {served(server)} requests by status")  # the reliability figures (pytest -s)
    assert server.stop() == 0, server.log.read_text()[-3000:]


def served(server: Server) -> dict[str, float]:
    """tandem_http_requests_total summed by status, from the server's /metrics."""
    by_status: dict[str, float] = {}
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("tandem_http_requests_total{"):
            status = line.split('status="', 1)[1].split('"', 1)[0]
            by_status[status] = by_status.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return dict(sorted(by_status.items()))


CHAT = [{"role": "user", "content": "hi"}]
SURROGATE_CASES = [
    ("/api/generate", {"model": "tiny", "prompt": "a\udc00b"}, "prompt"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "system": "\ud800"}, "system"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "template": "\ud800"}, "template"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "suffix": "\ud800"}, "suffix"),
    ("/api/generate", {"model": "tiny", "prompt": "x", "format": "\ud800"}, "format"),
    (
        "/api/generate",
        {"model": "tiny", "prompt": "x", "options": {"stop": ["ok", "\ud800"]}},
        "options.stop[1]",
    ),
    ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"\ud800": 1}}, "options"),
    (
        "/api/chat",
        {"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}]},
        "messages[0].content",
    ),
    ("/api/chat", {"model": "tiny", "messages": [{"role": "\ud800", "content": "x"}]}, "messages[0].role"),
    ("/api/chat", {"model": "tiny", "messages": [{**CHAT[0], "name": "\ud800"}]}, "messages[0].name"),
    ("/api/show", {"model": "\ud800"}, "model"),
    ("/api/pull", {"model": "\ud800", "stream": False}, "model"),
    ("/api/delete", {"model": "\ud800"}, "model"),
    ("/v1/chat/completions", {"model": "\ud800", "messages": CHAT}, "model"),
    (
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
        "messages[0].content[0].text",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": "\ud800"}, "stop"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["a", "\ud800"]}, "stop[1]"),
]


def post(server: Server, path: str, body: object) -> httpx.Response:
    # json.dumps writes a lone surrogate as the escape "\ud800": valid JSON, but not Unicode text.
    method = "DELETE" if path == "/api/delete" else "POST"
    return httpx.request(method, server.url + path, content=json.dumps(body).encode(), timeout=30)


def error_message(r: httpx.Response, path: str) -> str:
    err = r.json()["error"]
    return err["message"] if path.startswith("/v1/") else err


@pytest.mark.parametrize(("path", "body", "field"), SURROGATE_CASES)
def test_lone_surrogate_is_400_naming_the_field(
    tiny_server: Server, path: str, body: dict, field: str
) -> None:
    r = post(tiny_server, path, body)
    assert r.status_code == 400, r.text
    msg = error_message(r, path)
    assert f"'{field}'" in msg and "lone surrogate" in msg, msg
    if path.startswith("/v1/"):
        assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"])
def test_model_name_too_long_for_the_store_is_400(tiny_server: Server, path: str) -> None:
    body = {"prompt": "x", "messages": CHAT}
    r = post(tiny_server, path, {**body, "model": "a" * 300})  # each name part becomes a file name
    assert r.status_code == 400, r.text
    msg = error_message(r, path)
    assert "'model'" in msg and "at most 80 characters" in msg and len(msg) < 400
    r = post(tiny_server, path, {**body, "model": "a" * 45})  # long but valid: simply not served
    assert r.status_code == 404 and "not found" in error_message(r, path)


def test_pull_of_text_that_cannot_be_a_path_is_4xx(tiny_server: Server) -> None:
    for name in ("a\x00b", "~no-such-user-here/model", "x" * 300 + ".gguf", "y" * 300):
        r = post(tiny_server, "/api/pull", {"model": name, "stream": False})
        assert 400 <= r.status_code < 500, (name[:20], r.text)


# -- fuzzing every route -------------------------------------------------------------------------
ROUTES: list[tuple[str, str]] = [
    ("POST", "/api/generate"),
    ("POST", "/api/chat"),
    ("POST", "/api/show"),
    ("POST", "/api/pull"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/copy"),
    ("POST", "/api/create"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("GET", "/api/tags"),
    ("GET", "/api/ps"),
    ("GET", "/api/version"),
    ("GET", "/api/trace"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{id}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
]
# Strings that found bugs before, mixed into arbitrary text (lone surrogates included).
NASTY = ["tiny", "\ud800", "a\udfffb", "\u2028", "\x85", "\x00", "a" * 300, "../../etc", "~x", "", " "]
text = st.one_of(
    st.sampled_from(NASTY), st.text(max_size=20), st.text(st.characters(exclude_categories=()), max_size=4)
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | json_values,
        "content": text
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}))
        | json_values,
        "name": text,
        "images": json_values,
    },
)
FIELDS = {
    "model": st.sampled_from(["tiny", "tiny:latest"]) | text | json_values,
    "name": text,
    "prompt": text | st.lists(st.integers(-5, 300), max_size=4) | json_values,
    "messages": st.lists(message, max_size=3) | json_values,
    "system": text | json_values,
    "template": text,
    "suffix": text,
    "format": st.sampled_from(["json", ""]) | json_values,
    "raw": st.booleans() | json_values,
    "stream": st.booleans() | json_values,
    "context": st.lists(st.integers(-2, 300), max_size=4) | json_values,
    "options": st.dictionaries(
        st.sampled_from(["temperature", "top_k", "top_p", "seed", "stop", "num_ctx", "min_p"]) | text,
        json_values,
        max_size=4,
    )
    | json_values,
    "stop": text | st.lists(text, max_size=3) | json_values,
    "temperature": json_values,
    "logprobs": json_values,
    "top_logprobs": json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "keep_alive": json_values,
    "input": text | st.lists(text, max_size=3) | json_values,
    "instructions": text | json_values,
    "max_output_tokens": json_values,
    "tokens": st.lists(st.integers(-5, 300), max_size=4) | json_values,
    "from": text | json_values,
    "modelfile": text | json_values,
    "source": text | json_values,
    "destination": text | json_values,
    "dimensions": json_values,
    "truncate": json_values,
    "encoding_format": st.sampled_from(["float", "base64"]) | json_values,
}
# Mostly valid requests with odd text in them: these get as far as the model and the response.
PLAUSIBLE = {
    "model": st.sampled_from(["tiny", "tiny:latest"]),
    "prompt": text,
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": text}),
        min_size=1,
        max_size=3,
    ),
}
PLAUSIBLE_OPTIONAL = {
    "system": text,
    "raw": st.booleans(),
    "stream": st.booleans(),
    "stop": text | st.lists(text, max_size=2),
    "context": st.lists(st.integers(3, 258), max_size=3),
    "options": st.fixed_dictionaries(
        {},
        optional={
            "temperature": st.floats(0, 2),
            "seed": st.integers(0, 9),
            "stop": st.lists(text, max_size=2),
        },
    ),
    "temperature": st.floats(0, 2),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 3),
}
bodies = st.one_of(
    st.fixed_dictionaries(PLAUSIBLE, optional=PLAUSIBLE_OPTIONAL),
    st.fixed_dictionaries({}, optional=FIELDS),
    json_values,  # not even an object
)


def _bounded(body: object) -> object:
    """Keep any generation a handful of tokens long: the test is about parsing, not the model."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    body["max_tokens"] = 3
    body["max_output_tokens"] = 3
    opts = body.get("options")
    if opts is None or isinstance(opts, dict):
        body["options"] = {**(opts or {}), "num_predict": 3}
    return body


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=[r for _, r in ROUTES])
@settings(
    max_examples=ROUTE_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(body=bodies, model_id=text)
def test_no_route_answers_500_or_hangs(
    tiny_server: Server, method: str, route: str, body: object, model_id: str
) -> None:
    path = route.replace("{id}", quote(model_id, safe="", errors="surrogatepass"))
    content = json.dumps(_bounded(body)).encode()
    # The timeout is the hang check: a short generation or a refusal takes well under a second.
    r = httpx.request(method, tiny_server.url + path, content=content, timeout=TIMEOUT_S)
    event(f"status {r.status_code}")
    assert r.status_code < 500, (r.status_code, r.text[:500])
    assert "internal error" not in r.text, r.text[:500]
    if r.headers.get("content-type", "").startswith(("application/json", "application/x-ndjson")):
        for line in r.text.splitlines():  # what ollama-python does with a stream
            json.loads(line)


# -- schemathesis: the server's own OpenAPI document ---------------------------------------------
@pytest.fixture(scope="module")
def openapi(tiny_server: Server) -> schemathesis.BaseSchema:
    r = httpx.get(tiny_server.url + "/openapi.json", timeout=10)
    assert r.status_code == 200
    doc = r.json()
    # The bodies are described, not just the paths: otherwise the fuzzing would send none.
    for path in ("/api/generate", "/api/chat", "/v1/chat/completions", "/v1/responses", "/tokenize"):
        assert doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"
        ]
    assert doc["paths"]["/api/delete"]["delete"]["requestBody"]
    return schemathesis.openapi.from_dict(doc)


schema = schemathesis.pytest.from_fixture("openapi")


@schema.parametrize()
@settings(
    max_examples=SCHEMA_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_no_500_and_no_hang(case: schemathesis.Case, tiny_server: Server) -> None:
    if isinstance(case.body, dict):
        case.body = _bounded(case.body)
    response = case.call(base_url=tiny_server.url, timeout=TIMEOUT_S)
    case.validate_response(response, checks=[not_a_server_error])
    assert "internal error" not in response.text, response.text[:500]
