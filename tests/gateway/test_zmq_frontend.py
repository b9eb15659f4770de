"""The ZeroMQ front end end to end: a real engine on a tiny GGUF, a real ROUTER, raw DEALER peers.

The server (AsyncEngine + ZmqFrontend) runs in a background thread with its own event loop; the
tests talk to it over ipc and tcp like any client would, and read the scheduler's Stats through
the engine to see that cancelled requests really free their slot and KV blocks.

Run: python -m pytest tests/gateway -q
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import descendants, wait_until

from tandem.actors.sockets import ipc_path
from tandem.client import AsyncTandemClient, InvalidRequestError, ShuttingDownError, TandemClient
from tandem.config import EngineConfig
from tandem.engine.aio import AsyncEngine
from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.gateway.zmq_frontend import ZmqFrontend, longest_token_bytes
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
    KeepAlive,
    RequestError,
    SamplingParams,
    ServerHello,
    Stats,
    TokenDelta,
    decode,
    encode,
)
from tandem.prompts.build import prompt_ids
from tandem.shm import list_segments

MAX_MSG = 1 << 20
CONTEXT = 4096
# ~10 s on the tiny model: a test that sees it end early knows it was cancelled
LONG = SamplingParams(max_tokens=CONTEXT - 100, temperature=0.0, ignore_eos=True)


class ServerThread:
    """AsyncEngine + ZmqFrontend on their own event loop in a thread."""

    def __init__(self, cfg: EngineConfig, endpoints: list[str]) -> None:
        self.cfg, self.endpoints_asked = cfg, endpoints
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="test-server")

    def start(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(60), "server did not start"
        if self.error:
            raise self.error
        return self

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.engine = AsyncEngine(self.cfg)
        try:
            await self.engine.start()
            self.frontend = await ZmqFrontend(self.engine, self.endpoints_asked, max_msg_size=MAX_MSG).start()
        except BaseException as e:
            self.error = e
            await self.engine.close()
            self.ready.set()
            return
        self.ready.set()
        await self._stop.wait()
        await self.frontend.close()
        await self.engine.close()

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stats(self) -> Stats:
        return self.call(self.engine.stats())

    def idle(self) -> bool:
        s = self.stats()
        return s.running == 0 and s.waiting == 0 and s.kv_blocks_used == 0

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    model = write_tiny_gguf(tmp_path_factory.mktemp("model") / "tiny.gguf", TinySpec(context=CONTEXT))
    # float32: outputs are compared across batchings token for token (bf16 is not batch-invariant).
    cfg = EngineConfig(model_path=str(model), kv_cache_memory=64 * 2**20, model_name="tiny", dtype="float32")
    srv = ServerThread(cfg, ["ipc://", "tcp://127.0.0.1:0"]).start()
    kids = descendants(os.getpid())
    assert kids, "the engine's processes should be running"
    # Other test runs may share /dev/shm: look only at segments named after our processes.
    ours = lambda: {s for p in kids | {os.getpid()} for s in list_segments(pid=p)}  # noqa: E731
    assert ours(), "the engine's ring segment should exist"
    ipc_dir = ipc_path(srv.frontend.endpoints[0]).parent  # type: ignore[union-attr]
    engine_dir = srv.engine.process.runtime_dir
    assert ipc_dir.stat().st_mode & 0o777 == 0o700
    yield srv
    srv.stop()
    wait_until(lambda: not (kids & descendants(os.getpid())), 5.0)
    assert not ours(), "shared-memory segments left behind"
    assert not ipc_dir.exists() and engine_dir is not None and not engine_dir.exists()


@pytest.fixture(autouse=True)
def settled(server: ServerThread) -> Iterator[None]:
    yield
    wait_until(server.idle, 3.0)  # nothing a test started may keep running in the scheduler


class Raw:
    """A bare DEALER: frames exactly as the protocol describes them, no client library."""

    def __init__(self, url: str, envelope: bool = False) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.envelope = envelope

    def send(self, msg: Any) -> None:
        self.send_bytes(encode(msg))

    def send_bytes(self, *frames: bytes) -> None:
        self.sock.send_multipart([b"", *frames] if self.envelope else list(frames))

    def recv(self, timeout: float = 5.0) -> Any:
        while True:
            assert self.sock.poll(int(timeout * 1000)), "no reply"
            frames = self.sock.recv_multipart()
            if self.envelope:
                assert frames[0] == b"" and len(frames) == 2
            msg = decode(frames[-1])
            if not isinstance(msg, KeepAlive):
                return msg

    def until_terminals(self, rids: set[str], timeout: float = 20.0) -> dict[str, list[Any]]:
        """Every frame per request id until each has a terminal, plus a quiet period for extras."""
        frames: dict[str, list[Any]] = {r: [] for r in rids}
        deadline, quiet_until = time.monotonic() + timeout, None
        while quiet_until is None or time.monotonic() < quiet_until:
            assert time.monotonic() < deadline, {r: f[-1:] for r, f in frames.items()}
            if not self.sock.poll(50):
                continue
            msg = decode(self.sock.recv_multipart()[-1])
            if isinstance(msg, KeepAlive):
                continue
            frames.setdefault(msg.request_id, []).append(msg)
            if quiet_until is None and all(
                f and isinstance(f[-1], Finished | RequestError) for f in frames.values()
            ):
                quiet_until = time.monotonic() + 0.3
        return frames

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


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
    frames = raw.until_terminals({"text", "ids", "none", "both", "bad-ids", "long", "typed"})
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


def test_garbage_frames_get_errors_and_the_server_keeps_serving(server: ServerThread, raw: Raw) -> None:
    for junk in (
        [b"\xc1\x00garbage"],
        [msgpack.packb([999, "x"])],
        [b"\x93\x01\x02"],
        [b"a", b"b"],
        [encode(Finished("x", "stop", 1, 1))],
        [msgpack.packb([53, 42, "not a prompt"])],
    ):
        raw.send_bytes(*junk)
        err = raw.recv()
        assert isinstance(err, RequestError) and err.code == "invalid_request" and err.request_id == "", junk
    raw.send_bytes(b"x" * (MAX_MSG + 1))  # over MAXMSGSIZE: libzmq drops that connection
    time.sleep(0.2)
    ok = Raw(server.frontend.endpoints[0], envelope=True)  # REQ-style envelope, mirrored in replies
    try:
        ok.send(GenerateRequest("ok", prompt="still there?", params=SamplingParams(max_tokens=3)))
        frames = ok.until_terminals({"ok"})["ok"]
        assert isinstance(frames[0], Accepted) and isinstance(frames[-1], Finished)
    finally:
        ok.close()


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
# --------------------------------------------------------------------------------------
BAD = "\x00not-utf8\x00"  # a placeholder string, replaced in the packed frame by bytes that are not UTF-8
BAD_STOP = [3, 0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, None, [BAD]]  # sampling params whose stop string is not UTF-8


def pack(values: list[Any]) -> bytes:
    """``values`` as msgpack, every BAD string turned into invalid UTF-8 (msgpack cannot write that)."""
    return msgpack.packb(values).replace(BAD.encode(), b"\xff" * len(BAD))


def generate_frame(
    rid: Any,
    prompt: Any = "hi",
    ids: Any = None,
    messages: Any = None,
    raw_: Any = False,
    system: Any = None,
    params: Any = (3, 0.0),
    stream: Any = True,
) -> bytes:
    params = list(params) if isinstance(params, tuple) else params
    return pack([GenerateRequest.TAG, rid, prompt, ids, messages, raw_, system, params, stream])


def sized_prompt_frame(rid: str, size: int) -> bytes:
    """A GenerateRequest frame of exactly ``size`` bytes, nearly all of it prompt text."""
    n = size - len(generate_frame(rid, "x" * 70000))
    frame = generate_frame(rid, "x" * (70000 + n))
    assert len(frame) == size
    return frame


def _only_terminal(r: Raw, timeout: float) -> Any:
    got = r.recv(timeout)
    assert isinstance(got, RequestError | Finished), f"expected the terminal frame at once, got {got}"
    return got


def test_huge_prompts_get_one_terminal_at_once_and_stall_nobody(server: ServerThread) -> None:
    async def roomy() -> ZmqFrontend:  # the default limit of `tandem serve`, not this module's small one
        return await ZmqFrontend(server.engine, ["ipc://"], max_msg_size=16 * 2**20).start()

    fe = server.call(roomy())
    big, other = Raw(fe.endpoints[0]), Raw(fe.endpoints[0])
    try:
        huge_ids = [5] * (5 * 2**20)
        frames = {
            "text": sized_prompt_frame("text", 5_242_960),
            "ids": generate_frame("ids", None, ids=huge_ids),
            "chat": generate_frame("chat", None, messages=[["user", "y" * (5 * 2**20)]]),
        }
        for rid, frame in frames.items():
            big.send_bytes(frame)
            other.send(HealthRequest(1))
            t0 = time.monotonic()
            # a stalled event loop answers nobody: the health query shows it does not stall
            assert isinstance(other.recv(timeout=1.5), Health), rid
            err = _only_terminal(big, timeout=2.5)
            assert time.monotonic() - t0 < 2.5
            assert err.request_id == rid and err.code == "context_length", err
            assert f"context of {CONTEXT} tokens" in err.message or f"holds {CONTEXT}" in err.message
        assert not big.sock.poll(300), "nothing may follow the terminal frame"
        # still serving, and a prompt that does fit is not refused by the size rule
        big.send(GenerateRequest("fits", prompt="z" * 20000, raw=True, params=SamplingParams(max_tokens=1)))
        assert big.until_terminals({"fits"})["fits"][-1].code == "context_length"  # tokenized: 20000 > 4096
        big.send(GenerateRequest("ok", prompt="hello", params=SamplingParams(max_tokens=2)))
        assert isinstance(big.until_terminals({"ok"})["ok"][-1], Finished)
    finally:
        big.close()
        other.close()
        server.call(fe.close())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(
        st.one_of(
            st.text(max_size=40), st.sampled_from(["<|im_start|>", "<|im_end|>", " " * 64, "\n" * 9, "the "])
        ),
        max_size=12,
    )
)
def test_no_prompt_the_size_rule_refuses_could_fit(server: ServerThread, parts: list[str]) -> None:
    """The rule's premise: no token stands for more text than the longest token's bytes."""
    tok = server.engine.tokenizer
    longest = longest_token_bytes(tok)
    text = "".join(parts)
    for ids in (tok.encode(text, parse_special=True), prompt_ids(tok, text), prompt_ids(tok, text, raw=True)):
        assert len(ids) * longest >= len(text.encode("utf-8"))


@pytest.mark.parametrize(
    ("frame", "rid", "param"),
    [
        pytest.param(generate_frame("u1", f"hi {BAD}"), "u1", "prompt", id="prompt-not-utf8"),
        pytest.param(generate_frame("u2", "hi", system=BAD), "u2", "system", id="system-not-utf8"),
        pytest.param(
            generate_frame("u3", None, messages=[["user", "ok"], ["user", BAD]]),
            "u3",
            "messages",
            id="chat-content-not-utf8",
        ),
        pytest.param(generate_frame("u4", params=BAD_STOP), "u4", "stop", id="stop-not-utf8"),
        pytest.param(generate_frame("t1", params=5), "t1", "params", id="params-not-an-array"),
        pytest.param(generate_frame("t2", None, messages=7), "t2", "messages", id="messages-not-an-array"),
        pytest.param(generate_frame("t3", None, messages=[["user"]]), "t3", "messages", id="message-short"),
        pytest.param(generate_frame("t4", raw_="yes"), "t4", "raw", id="raw-not-a-bool"),
        pytest.param(generate_frame("t5", ["x" * 10000]), "t5", "prompt", id="prompt-not-a-string"),
        pytest.param(generate_frame(BAD), "", "request_id", id="id-not-utf8"),
        pytest.param(generate_frame(42), "", "request_id", id="id-an-int"),
        pytest.param(generate_frame(b"bytes-id"), "", "request_id", id="id-bytes"),
        pytest.param(pack([Cancel.TAG, BAD]), "", None, id="cancel-id-not-utf8"),
        pytest.param(pack([Cancel.TAG, 5]), "", "request_id", id="cancel-id-an-int"),
        pytest.param(pack([HealthRequest.TAG, {BAD: 1}]), "", None, id="health-query-not-utf8"),
    ],
)
def test_malformed_fields_are_refused_under_their_request_id(
    server: ServerThread, raw: Raw, frame: bytes, rid: str, param: str | None
) -> None:
    before = server.frontend.undecodable_frames
    raw.send_bytes(frame)
    err = _only_terminal(raw, timeout=5.0)
    assert isinstance(err, RequestError) and err.code == "invalid_request" and err.request_id == rid, err
    if param is not None:
        assert f"invalid parameter '{param}'" in err.message, err
    assert len(err.message) <= 300 and "x" * 300 not in err.message  # client data is not echoed at length
    assert server.frontend.undecodable_frames == before + (rid == "")
    assert not raw.sock.poll(200), "exactly one terminal frame"


_INT = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    _INT,
    st.floats(),
    st.text(max_size=6),
    st.binary(max_size=6),
    st.just(BAD),
    st.lists(st.one_of(st.integers(-3, 300), st.text(max_size=3), st.just(BAD), st.none()), max_size=3),
    st.dictionaries(st.text(max_size=3), _INT, min_size=1, max_size=2),
)
# Never a value that decodes to default sampling params (no max_tokens: a generation as long as the context)
_PARAMS = st.one_of(
    st.just([3, 0.0]),
    st.none(),
    st.booleans(),
    _INT,
    st.floats(),
    st.just(BAD),
    st.text(min_size=1, max_size=4),
    st.tuples(st.just(3), _JUNK).map(list),
    st.just(BAD_STOP),
)
_REQUEST = st.fixed_dictionaries(
    {
        "rid": st.one_of(st.text(max_size=8).map(lambda t: ("text", t)), _JUNK.map(lambda j: ("junk", j))),
        "prompt": st.one_of(st.none(), st.just("hi"), st.just(f"say {BAD}"), _JUNK),
        "ids": st.one_of(st.none(), st.just([5, 6]), _JUNK),
        "messages": st.one_of(
            st.none(),
            st.just([["user", "hi"]]),
            st.just([["user", BAD]]),
            st.just([["user"]]),
            st.just([7]),
            _JUNK,
        ),
        "raw_": st.one_of(st.booleans(), _JUNK),
        "system": st.one_of(st.none(), st.just("be brief"), _JUNK),
        "params": _PARAMS,
        "stream": st.one_of(st.booleans(), _JUNK),
    }
)


class WellBehaved(threading.Thread):
    """A client that keeps generating while another one sends junk; it must never fail."""

    def __init__(self, url: str) -> None:
        super().__init__(name="well-behaved", daemon=True)
        self.url, self.done, self.errors = url, 0, []  # type: ignore[var-annotated]
        self.halt = threading.Event()

    def run(self) -> None:
        with TandemClient(self.url, timeout=10) as c:
            while not self.halt.is_set():
                try:
                    out = c.generate("steady", max_tokens=2, ignore_eos=True, temperature=0)
                    assert out.finish_reason == "length", out
                    self.done += 1
                except Exception as e:  # every failure is reported by the test
                    self.errors.append(repr(e))


def test_any_generate_frame_gets_one_terminal_under_its_readable_id(server: ServerThread, raw: Raw) -> None:
    well = WellBehaved(server.frontend.endpoints[1])
    well.start()
    counter = iter(range(10**6))

    @settings(
        max_examples=80,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(req=_REQUEST)
    def check(req: dict[str, Any]) -> None:
        kind, value = req.pop("rid")
        rid = f"h{next(counter)}-{value}" if kind == "text" else value
        readable = isinstance(rid, str) and BAD not in rid
        expect = rid if readable else ""
        before = server.frontend.undecodable_frames
        raw.send_bytes(generate_frame(rid, **req))
        deadline = time.monotonic() + 10
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            assert raw.sock.poll(left_ms), f"no terminal frame for {rid!r}"
            msg = decode(raw.sock.recv_multipart()[-1])
            if isinstance(msg, KeepAlive):
                continue
            assert msg.request_id == expect, f"a frame for {msg.request_id!r} while waiting on {rid!r}: {msg}"
            if isinstance(msg, Finished | RequestError):
                break
            assert isinstance(msg, Accepted | TokenDelta), msg
        assert server.frontend.undecodable_frames == before + (expect == "")
        if not readable:
            assert isinstance(msg, RequestError) and "'request_id'" in msg.message, msg

    try:
        check()
    finally:
        well.halt.set()
        well.join(20)
    assert not raw.sock.poll(300), "a frame after a request's terminal frame"
    assert well.errors == [] and well.done > 0, well.errors
