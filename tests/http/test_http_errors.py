"""Every error case of the HTTP API with raw httpx: statuses, shapes, and never a 500 for a
client's mistake; plus queue-full, client disconnects and worker death on real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LONG, TINY_CONTEXT, Server, free_port, raw_post, tiny_home, wait_for

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[Server]:
    """One sequence at a time and a queue of one: the third request is refused as busy."""
    s = Server(tiny_home(tmp_path_factory, tiny_gguf), args=("--max-num-seqs", "1", "--max-queue", "1"))
    s.start()
    yield s
    assert s.stop() == 0, s.log.read_text()[-3000:]


def post(server: Server, path: str, body: object = None, content: bytes | None = None) -> httpx.Response:
    if content is None and body is not None:
        content = json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, timeout=30)


def ollama_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    return body["error"]


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"])
def test_empty_and_invalid_json_are_400(server: Server, path: str) -> None:
    for content in (b"", b"{not json", b"[1, 2]", b"null", b'"text"'):
        r = post(server, path, content=content)
        if path.startswith("/v1/"):
            assert openai_error(r, 400)["type"] == "invalid_request_error"
        else:
            ollama_error(r, 400)


def test_deeply_nested_json_is_400(server: Server) -> None:
    r = post(server, "/api/generate", content=b"[" * 100_000 + b"]" * 100_000)
    ollama_error(r, 400)


def test_missing_and_unknown_model(server: Server) -> None:
    assert "model is required" in ollama_error(post(server, "/api/generate", {"prompt": "x"}), 400)
    assert openai_error(post(server, "/v1/chat/completions", {"messages": CHAT}), 400)["param"] == "model"
    msg = ollama_error(post(server, "/api/chat", {"model": "ghost", "messages": CHAT}), 404)
    assert "model 'ghost' not found" in msg
    err = openai_error(post(server, "/v1/completions", {"model": "ghost", "prompt": "x"}), 404)
    assert "model 'ghost' not found" in err["message"] and err["code"] == "model_not_found"
    assert ollama_error(post(server, "/api/show", {"model": "ghost"}), 404) == "model 'ghost' not found"


BAD_OLLAMA_OPTIONS = [
    ("temperature", -1),
    ("temperature", "hot"),
    ("temperature", float("nan")),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_k", "many"),
    ("min_p", 2),
    ("num_predict", 0),
    ("num_predict", 1.5),
    ("seed", "abc"),
    ("stop", 5),
    ("repeat_penalty", 0),
    ("presence_penalty", 9),
    ("num_ctx", 1),
]


@pytest.mark.parametrize(("name", "value"), BAD_OLLAMA_OPTIONS)
def test_invalid_ollama_option_names_it(server: Server, name: str, value: object) -> None:
    body = {"model": "tiny", "prompt": "x", "options": {name: value}}
    assert name in ollama_error(post(server, "/api/generate", body), 400)


BAD_OPENAI = [
    ("temperature", -0.1),
    ("temperature", 2.5),
    ("temperature", float("nan")),
    ("temperature", "warm"),
    ("top_p", 0),
    ("top_p", 1.01),
    ("max_tokens", 0),
    ("max_tokens", "ten"),
    ("presence_penalty", 3),
    ("frequency_penalty", True),
    ("seed", 1.5),
    ("n", 0),
    ("n", 1000),
    ("top_logprobs", 50),
    ("stop", [1, 2]),
    ("stream", "yes"),
]


@pytest.mark.parametrize(("name", "value"), BAD_OPENAI)
def test_invalid_openai_parameter_names_it(server: Server, name: str, value: object) -> None:
    body = {"model": "tiny", "messages": CHAT, name: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    err = openai_error(post(server, "/v1/chat/completions", body), 400)
    assert err["param"] == name and name in err["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/chat", {"model": "tiny", "messages": "hello"}),
        ("/api/chat", {"model": "tiny", "messages": [1]}),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "alien", "content": "x"}]}),
        ("/api/chat", {"model": "tiny", "messages": CHAT, "options": [1]}),
        ("/api/chat", {"model": "tiny", "messages": CHAT, "tools": [{"type": "function"}]}),
        ("/api/chat", {"model": "tiny", "messages": CHAT, "think": True}),
        ("/api/generate", {"model": "tiny", "prompt": 5}),
        ("/api/generate", {"model": 5, "prompt": "x"}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": "abc"}),
        ("/api/generate", {"model": "tiny", "context": [10**9]}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "images": ["aGk="]}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "top_logprobs": 21, "logprobs": True}),
        ("/api/pull", {}),
        ("/api/delete", {"model": 3}),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": 5}]}),
        (
            "/v1/chat/completions",
            {"model": "tiny", "messages": CHAT, "response_format": {"type": "xml"}},
        ),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "stream_options": 1, "stream": True}),
        ("/v1/completions", {"model": "tiny", "prompt": []}),
        ("/v1/completions", {"model": "tiny", "prompt": ["a", 3]}),
        ("/v1/completions", {"model": "tiny", "prompt": {"x": 1}}),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "echo": True, "max_tokens": -1}),
        ("/v1/completions", {"model": "tiny", "prompt": [10**30]}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "context": [-1]}),
        ("/api/generate", {"model": "tiny", "prompt": "x", "options": {"top_k": 10**30}}),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "seed": 2**70}),
        ("/api/show", {"model": "../../etc/passwd"}),
        ("/api/pull", {"model": "/etc", "stream": False}),
    ],
)
def test_malformed_requests_are_4xx_never_500(server: Server, path: str, body: dict) -> None:
    r = post(server, path, body)
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


def test_prompt_longer_than_context_names_both_counts(server: Server, tiny_tokenizer) -> None:
    prompt = "x" * (TINY_CONTEXT + 500)
    n = len(tiny_tokenizer.encode(prompt, parse_special=False))
    msg = ollama_error(post(server, "/api/generate", {"model": "tiny", "prompt": prompt, "raw": True}), 400)
    assert str(n) in msg and str(TINY_CONTEXT) in msg
    err = openai_error(post(server, "/v1/completions", {"model": "tiny", "prompt": prompt}), 400)
    assert str(n) in err["message"] and str(TINY_CONTEXT) in err["message"]
    assert err["code"] == "context_length_exceeded"
    # num_ctx narrows the context per request, as in ollama
    body = {"model": "tiny", "prompt": "x" * 300, "raw": True, "options": {"num_ctx": 256}}
    assert "256" in ollama_error(post(server, "/api/generate", body), 400)


def test_queue_full_is_503_with_retry_after(server: Server) -> None:
    gen = {"model": "tiny", "prompt": "x", "options": LONG}
    with httpx.Client(base_url=server.url, timeout=30) as c, c.stream("POST", "/api/generate", json=gen) as a:
        lines = a.iter_lines()
        next(lines)  # A runs: it holds the one batch slot
        queued = raw_post(server, "/api/generate", gen)  # B waits in the queue of one
        wait_for(lambda: server.ps()["waiting"] == 1)
        r = post(server, "/api/generate", {**gen, "stream": False})
        assert "server busy" in ollama_error(r, 503)
        assert int(r.headers["Retry-After"]) >= 1
        r = post(server, "/v1/chat/completions", {"model": "tiny", "messages": CHAT})
        assert openai_error(r, 503)["code"] == "server_busy" and int(r.headers["Retry-After"]) >= 1
        queued.close()  # B leaves while still queued: it must leave the queue too
        wait_for(lambda: server.ps()["waiting"] == 0)
    wait_for(lambda: server.ps()["running"] == 0)


def test_retry_after_is_within_3x_of_the_actual_wait(server: Server) -> None:
    """Retry-After is the scheduler's estimate from its measured step time and the running
    request's remaining tokens; a client that waits that long gets in."""
    calib = {
        "model": "tiny",
        "prompt": "x",
        "stream": False,
        "options": {"num_predict": 200, "ignore_eos": True},
    }
    t = time.monotonic()
    assert post(server, "/api/generate", calib).status_code == 200
    per_token = (time.monotonic() - t) / 200
    n = min(TINY_CONTEXT - 64, max(200, int(5.0 / per_token)))  # runs for seconds
    gen = {"model": "tiny", "prompt": "x", "options": {"num_predict": n, "ignore_eos": True}}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", "/api/generate", json=gen) as a:
        assert a.status_code == 200
        lines = a.iter_lines()  # kept: dropping the iterator would close the stream
        next(lines)  # A runs
        queued = raw_post(server, "/api/generate", {**gen, "options": {"num_predict": 1}})
        wait_for(lambda: server.ps()["waiting"] == 1)
        r = post(server, "/api/generate", {**gen, "stream": False})
        refused_at = time.monotonic()
        assert r.status_code == 503
        retry_after = int(r.headers["Retry-After"])
        probe = {"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 1}}
        while post(server, "/api/generate", probe).status_code == 503:
            time.sleep(0.05)
        waited = time.monotonic() - refused_at
        queued.close()
    assert retry_after / 3 <= waited <= retry_after * 3, (retry_after, waited)
    wait_for(lambda: server.ps()["running"] == 0 and server.ps()["waiting"] == 0, timeout=30)


def test_client_disconnect_frees_slot_and_blocks(server: Server) -> None:
    body = {"model": "tiny", "messages": CHAT, "options": LONG}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/api/chat", json=body) as r:
            lines = r.iter_lines()
            next(lines), next(lines)
            ps = server.ps()
            assert ps["running"] == 1 and ps["kv_blocks_used"] > 0
        # the stream is closed: the request must be gone within about a step, not at its end
        freed = wait_for(lambda: (p := server.ps())["running"] == 0 and p["kv_blocks_used"] == 0, timeout=1.0)
        assert freed < 1.0
        metrics = c.get("/metrics").text
        tiny = '{model="tiny:latest"}'
        assert (
            f"tandem_running_sequences{tiny} 0.0" in metrics and f"tandem_kv_blocks_used{tiny} 0.0" in metrics
        )
        assert 'tandem_request_outcomes_total{model="tiny:latest",reason="cancelled"}' in metrics
        # OpenAI SSE stream, and a non-streamed request whose client gives up
        oai = {"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": 3000, "ignore_eos": True}
        with c.stream("POST", "/v1/chat/completions", json=oai) as r:
            next(r.iter_lines())
        wait_for(lambda: server.ps()["running"] == 0, timeout=1.0)
        with pytest.raises(httpx.ReadTimeout):
            c.post(
                "/api/generate",
                json={"model": "tiny", "prompt": "x", "stream": False, "options": LONG},
                timeout=0.5,
            )
        wait_for(lambda: (p := server.ps())["running"] == 0 and p["kv_blocks_used"] == 0, timeout=1.0)


def test_worker_death_ends_streams_with_an_error_then_recovers(server: Server) -> None:
    body = {"model": "tiny", "prompt": "x", "options": LONG}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/api/generate", json=body) as r:
            lines = r.iter_lines()
            assert not json.loads(next(lines))["done"]
            os.kill(server.worker_pid(), signal.SIGKILL)
            rest = [json.loads(line) for line in lines if line]
        assert r.status_code == 200
        assert "error" in rest[-1] and all("error" not in x for x in rest[:-1])
        assert not any(x.get("done") for x in rest)  # exactly one terminal line: the error
        wait_for(lambda: c.get("/health").status_code == 200, timeout=60, step=0.2)
        oai = {"model": "tiny", "messages": CHAT, "stream": True, "max_tokens": 3000, "ignore_eos": True}
        with c.stream("POST", "/v1/chat/completions", json=oai) as r:
            events = r.iter_lines()
            assert next(events).startswith("data: {")
            os.kill(server.worker_pid(), signal.SIGKILL)
            data = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
        assert data[-1] != "[DONE]" and "[DONE]" not in data
        assert set(json.loads(data[-1])["error"]) == {"message", "type", "param", "code"}
        wait_for(lambda: c.get("/health").status_code == 200, timeout=60, step=0.2)
        r = c.post(
            "/api/generate",
            json={"model": "tiny", "prompt": "x", "stream": False, "options": {"num_predict": 3}},
        )
        assert r.status_code == 200 and r.json()["done"]


@pytest.fixture
def dead_engine_server(tiny_gguf: Path) -> Iterator[tuple[str, dict]]:
    """A gateway in this process over a real engine that gives up at the first worker death."""
    import uvicorn

    from tandem.config import EngineConfig
    from tandem.engine.aio import AsyncEngine
    from tandem.gateway.http import HttpSettings, build_app

    port = free_port()
    box: dict = {}
    ready = threading.Event()

    async def main() -> None:
        cfg = EngineConfig(str(tiny_gguf), "tiny:latest", kv_cache_memory=64 << 20, max_worker_deaths=1)
        engine = await AsyncEngine(cfg).start()
        app = build_app(engine, HttpSettings())
        server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off"))
        box.update(engine=engine, server=server)
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        ready.set()
        try:
            await task
        finally:
            await engine.close()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(120), "in-process server did not start"
    yield f"http://127.0.0.1:{port}", box
    box["server"].should_exit = True
    thread.join(30)
    assert not thread.is_alive()


def test_dead_worker_503_for_new_and_error_line_for_running(dead_engine_server: tuple[str, dict]) -> None:
    url, box = dead_engine_server
    engine = box["engine"]
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        body = {"model": "tiny", "prompt": "x", "options": LONG}
        with c.stream("POST", "/api/generate", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(int(engine.ready_info["memory_plan"]["worker_pid"]), signal.SIGKILL)
            last = json.loads([line for line in lines if line][-1])
        assert "error" in last
        wait_for(lambda: engine.dead is not None, timeout=10)
        assert c.get("/health").status_code == 503
        assert ollama_error(c.post("/api/generate", json={"model": "tiny", "prompt": "x"}), 503)
        err = openai_error(c.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT}), 503)
        assert err["type"] == "server_error"
        assert 'tandem_worker_alive{model="tiny:latest"} 0.0' in c.get("/metrics").text


def test_an_idle_keep_alive_connection_outlives_common_client_pools(server: Server) -> None:
    """httpx drops pooled connections after 5 s idle, uvicorn's default close: a reuse at that
    instant was reset. The server holds idle connections well past that."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for pause in (6, 0):
            conn.request("GET", "/api/version")
            reply = conn.getresponse()
            assert reply.status == 200 and b"version" in reply.read()
            sock = conn.sock
            time.sleep(pause)
        conn.request("GET", "/api/version")  # http.client reconnects silently: check it did not
        assert conn.getresponse().status == 200 and conn.sock is sock
    finally:
        conn.close()
