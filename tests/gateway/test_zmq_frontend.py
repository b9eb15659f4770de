"""The ZeroMQ front end end to end: a real engine on a tiny GGUF, a real ROUTER, raw DEALER peers
(tests/zmq_server.py). Frames a broken or hostile client sends are tests/stress/test_zmq_protocol.py's.

Run: python -m pytest tests/gateway -q
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from procs import wait_until
from zmq_server import CONTEXT, LONG, MAX_MSG, Raw, ServerThread, serve_tiny

from tandem.actors.sockets import ipc_path
from tandem.client import AsyncTandemClient, InvalidRequestError, ShuttingDownError, TandemClient
from tandem.gateway.zmq_frontend import ZmqFrontend
from tandem.messages import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    ChatMessage,
    ClientHello,
    Embedding,
    EmbedInputRequest,
    Finished,
    GenerateRequest,
    Health,
    HealthRequest,
    RequestError,
    SamplingParams,
    ServerHello,
    Stats,
    TokenDelta,
)
from tandem.prompts.build import prompt_ids


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with serve_tiny(tmp_path_factory) as srv:
        yield srv


@pytest.fixture(autouse=True)
def settled(server: ServerThread) -> Iterator[None]:
    yield
    wait_until(server.idle, 3.0)  # nothing a test started may keep running in the scheduler


@pytest.fixture
def raw(server: ServerThread) -> Iterator[Raw]:
    r = Raw(server.frontend.endpoints[0])
    yield r
    r.close()


# --------------------------------------------------------------------------------------
def test_hello_and_health(server: ServerThread, raw: Raw) -> None:
    raw.send(ClientHello(PROTOCOL_VERSION, "test"))
    hello = raw.recv()
    assert isinstance(hello, ServerHello) and hello.version == PROTOCOL_VERSION
    assert hello.model == "tiny" and hello.context_length == CONTEXT and "stream" in hello.capabilities
    assert "embeddings" in hello.capabilities and hello.revision == "1.3"
    assert hello.vocab_size == server.engine.tokenizer.vocab_size and hello.max_msg_size == MAX_MSG
    raw.send(HealthRequest(7))
    h = raw.recv()
    assert isinstance(h, Health) and h.query_id == 7 and h.status == "ok" and h.error == ""
    assert isinstance(h.stats, Stats) and h.stats.worker_alive


def test_version_mismatch_is_refused_clearly(raw: Raw) -> None:
    raw.send(ClientHello(PROTOCOL_VERSION + 1, "future"))
    assert isinstance(raw.recv(), ServerHello)  # still sent, so the client can say what it found
    err = raw.recv()
    assert isinstance(err, RequestError) and err.code == "unsupported_version" and err.request_id == ""
    assert f"v{PROTOCOL_VERSION + 1}" in err.message and f"v{PROTOCOL_VERSION}" in err.message


@pytest.mark.parametrize("which", [0, 1], ids=["ipc", "tcp"])
def test_stream_and_non_stream_agree(server: ServerThread, which: int) -> None:
    url = server.frontend.endpoints[which]
    assert url.startswith(("ipc://", "tcp://127.0.0.1:"))
    with TandemClient(url, timeout=10) as c:
        full = c.generate("The sky is", max_tokens=12, temperature=0, ignore_eos=True)
        with c.stream("The sky is", max_tokens=12, temperature=0, ignore_eos=True) as s:
            deltas = list(s)
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    assert full.prompt_token_ids == prompt_ids(server.engine.tokenizer, "The sky is")
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert "".join(d.text for d in deltas) == full.text
    assert s.finished is not None and s.finished.completion_tokens == 12
    assert full.usage["prompt_tokens"] == len(full.prompt_token_ids)


def test_every_request_gets_exactly_one_terminal(server: ServerThread, raw: Raw) -> None:
    vocab = server.engine.tokenizer.vocab_size
    reqs = {}
    for i in range(16):
        params = SamplingParams(
            max_tokens=3 + 4 * i,
            temperature=0.0 if i % 2 else 0.9,
            seed=i,
            ignore_eos=True,
            logprobs=1 if i % 3 == 0 else None,
        )
        reqs[f"r{i}"] = GenerateRequest(f"r{i}", prompt=f"prompt {i}", params=params, stream=i % 4 != 0)
    reqs["ids"] = GenerateRequest("ids", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=4))
    reqs["chat"] = GenerateRequest(
        "chat", messages=[ChatMessage("user", "hi")], params=SamplingParams(max_tokens=40, ignore_eos=True)
    )
    reqs["bad-temp"] = GenerateRequest("bad-temp", prompt="x", params=SamplingParams(temperature=-1.0))
    reqs["bad-ids"] = GenerateRequest("bad-ids", prompt_token_ids=[1, vocab], params=SamplingParams())
    reqs["two"] = GenerateRequest("two", prompt="x", messages=[ChatMessage("user", "y")])
    reqs["ctx"] = GenerateRequest("ctx", prompt_token_ids=[5] * (CONTEXT + 1))
    reqs["cancel"] = GenerateRequest("cancel", prompt="long", params=LONG)
    for r in reqs.values():
        raw.send(r)
    raw.send(Cancel("cancel"))
    frames = raw.until_terminals(set(reqs))
    assert set(frames) == set(reqs)
    for rid, fs in frames.items():
        terminals = [f for f in fs if isinstance(f, Finished | RequestError)]
        assert len(terminals) == 1 and fs[-1] is terminals[0], (rid, fs)
        if isinstance(fs[-1], Finished):
            assert isinstance(fs[0], Accepted) and all(isinstance(f, TokenDelta) for f in fs[1:-1])
    for i in range(16):
        fs = frames[f"r{i}"]
        assert fs[-1].finish_reason == "length" and fs[-1].completion_tokens == 3 + 4 * i
        deltas = fs[1:-1]
        assert sum(len(d.token_ids) for d in deltas) == 3 + 4 * i
        if i % 4 == 0:
            assert len(deltas) == 1  # stream=False: one delta with everything
        if i % 3 == 0:
            assert sum(len(d.logprobs) for d in deltas) == 3 + 4 * i
    assert frames["ids"][0].prompt_token_ids == [5, 6, 7]
    chat_ids = prompt_ids(server.engine.tokenizer, "hi")  # one user turn: the chat template
    assert frames["chat"][0].prompt_token_ids == chat_ids and frames["chat"][-1].completion_tokens == 40
    for rid, param in [("bad-temp", "temperature"), ("bad-ids", "prompt_token_ids"), ("two", "prompt")]:
        err = frames[rid][-1]
        assert err.code == "invalid_request" and f"'{param}'" in err.message, err
    assert frames["ctx"][-1].code == "context_length"
    assert frames["cancel"][-1].finish_reason == "cancelled"


def test_every_embed_request_gets_exactly_one_terminal(server: ServerThread, raw: Raw) -> None:
    """EmbedInputRequest (1.3) frames, good and bad: Accepted, Embedding, Finished, or one
    RequestError under the request id, malformed fields included."""
    vocab = server.engine.tokenizer.vocab_size
    for r in [
        EmbedInputRequest("text", "the sky is blue"),
        EmbedInputRequest("ids", None, [5, 6, 7]),
        EmbedInputRequest("none"),
        EmbedInputRequest("both", "x", [5]),
        EmbedInputRequest("bad-ids", None, [1, vocab]),
        EmbedInputRequest("long", None, [5] * (CONTEXT + 1), False),
    ]:
        raw.send(r)
    raw.send_bytes(msgpack.packb([EmbedInputRequest.TAG, "typed", 5]))
    raw.send_bytes(msgpack.packb([EmbedInputRequest.TAG, "cut", "some text"])[:-3])  # cut short
    frames = raw.until_terminals({"text", "ids", "none", "both", "bad-ids", "long", "typed", "cut"})
    for rid in ("text", "ids"):
        accepted, vec, fin = frames[rid]
        assert isinstance(accepted, Accepted) and isinstance(vec, Embedding) and isinstance(fin, Finished)
        assert vec.dims == 64 and len(vec.vector) == 4 * 64 and fin.prompt_tokens == accepted.prompt_tokens
    assert frames["ids"][0].prompt_token_ids == [5, 6, 7]
    for rid, words in [
        ("none", "exactly one of"),
        ("both", "exactly one of"),
        ("bad-ids", "prompt_token_ids"),
        ("long", "truncate is false"),
        ("typed", "invalid parameter 'prompt'"),
        ("cut", "invalid parameter 'prompt'"),
    ]:
        (err,) = frames[rid]
        assert isinstance(err, RequestError) and words in err.message, (rid, err)
    assert frames["long"][0].code == "context_length"


def test_cancel_frees_slot_and_blocks_within_a_second(server: ServerThread) -> None:
    with TandemClient(server.frontend.endpoints[0], timeout=10) as c:
        s = c.stream("tell me a long story", params=LONG)
        for _ in range(3):
            next(s)
        assert server.stats().running == 1
        t0 = time.monotonic()
        c.cancel(s.request_id)
        rest = list(s)
        assert s.finished is not None and s.finished.finish_reason == "cancelled"
        assert 3 + sum(len(d.token_ids) for d in rest) < LONG.max_tokens
        wait_until(server.idle, 1.0 - (time.monotonic() - t0))


@pytest.mark.parametrize("stream", [True, False])
def test_client_that_vanishes_is_cancelled(server: ServerThread, stream: bool) -> None:
    r = Raw(server.frontend.endpoints[1])
    r.send(GenerateRequest("gone", prompt="long", params=LONG, stream=stream))
    assert isinstance(r.recv(), Accepted)
    if stream:
        assert isinstance(r.recv(), TokenDelta)
    wait_until(lambda: server.stats().running == 1, 2.0)
    r.close()  # no Cancel: the server must notice the peer is gone
    wait_until(server.idle, 2.0)
    assert server.frontend.inflight == 0


def test_duplicate_ids_and_inflight_limit(server: ServerThread, raw: Raw) -> None:
    raw.send(GenerateRequest("dup", prompt="long", params=LONG))
    raw.send(GenerateRequest("dup", prompt="again", params=LONG))
    first = [raw.recv(), raw.recv()]  # the refusal and the first request's Accepted, in any order
    assert sorted(type(f).__name__ for f in first) == ["Accepted", "RequestError"]
    err = next(f for f in first if isinstance(f, RequestError))
    assert err.request_id == "dup" and err.code == "invalid_request" and "in flight" in err.message
    raw.send(Cancel("dup"))
    fs = raw.until_terminals({"dup"})["dup"]
    assert sum(isinstance(f, Finished | RequestError) for f in fs) == 1

    async def small() -> ZmqFrontend:
        return await ZmqFrontend(server.engine, ["ipc://"], max_inflight_per_client=2).start()

    fe = server.call(small())
    try:
        r = Raw(fe.endpoints[0])
        for i in range(3):
            r.send(GenerateRequest(f"q{i}", prompt="long", params=LONG))
        got = {(type(f).__name__, f.request_id) for f in (r.recv(), r.recv(), r.recv())}
        assert got == {("Accepted", "q0"), ("Accepted", "q1"), ("RequestError", "q2")}
        with TandemClient(fe.endpoints[0]) as c:
            s = c.stream("long", params=LONG)
            next(s)
            server.call(fe.close())  # in-flight requests end with a shutting_down error
            with pytest.raises(ShuttingDownError):
                list(s)
        fs = r.until_terminals({"q0", "q1"})
        assert all(f[-1].code == "shutting_down" for f in fs.values())
        r.close()
    finally:
        server.call(fe.close())
    assert not ipc_path(fe.endpoints[0]).exists()  # type: ignore[union-attr]


def test_async_client_on_the_server_thread_loop_sees_errors(server: ServerThread) -> None:
    async def go() -> None:
        async with AsyncTandemClient(server.frontend.endpoints[1]) as c:
            with pytest.raises(InvalidRequestError) as ei:
                await c.generate("x", top_p=0.0)
            assert ei.value.param == "top_p"

    asyncio.run(go())


def test_explicit_ipc_path_is_never_stolen(server: ServerThread, tmp_path: Path) -> None:
    path = tmp_path / "zmq.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a dead server's file: bound, never listened on, never unlinked
    stale.close()

    async def start() -> ZmqFrontend:
        return await ZmqFrontend(server.engine, [f"ipc://{path}"]).start()

    fe = server.call(start())  # the stale file is replaced
    try:
        with pytest.raises(OSError, match="already listening"):
            server.call(start())
        with TandemClient(f"ipc://{path}") as c:
            assert c.generate("hi", max_tokens=2, ignore_eos=True).finish_reason == "length"
    finally:
        server.call(fe.close())
    assert not path.exists()


# --------------------------------------------------------------------------------------
# Frames that do not decode, and prompts far over the context: one terminal frame each
