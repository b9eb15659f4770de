"""Frames a broken or hostile ZeroMQ client sends, against the front end's internals: garbage,
frames over the size limit, prompts far over the context, fields of the wrong type or not UTF-8,
each answered with exactly one terminal frame under the request's readable id (moved here from
tests/gateway/test_zmq_frontend.py; tests/stress/test_zmq_fuzz.py fuzzes a real `tandem serve`).

Run: python -m pytest tests/stress/test_zmq_protocol.py -q
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procs import wait_until
from zmq_server import CONTEXT, MAX_MSG, Raw, ServerThread, serve_tiny

from tandem.client import TandemClient
from tandem.gateway.zmq_frontend import ZmqFrontend, longest_token_bytes
from tandem.messages import (
    Accepted,
    Cancel,
    Finished,
    GenerateRequest,
    Health,
    HealthRequest,
    KeepAlive,
    RequestError,
    SamplingParams,
    TokenDelta,
    decode,
    encode,
)
from tandem.prompts.build import prompt_ids
from tandem.stress.zmq_fuzz import Raw as Spliced
from tandem.stress.zmq_fuzz import pack as raw_pack


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


# --------------------------------------------------------------------------------------
# Frames that do not decode, and prompts far over the context: one terminal frame each
# --------------------------------------------------------------------------------------
BAD = "\x00not-utf8\x00"  # a placeholder string, replaced in the packed frame by bytes that are not UTF-8
BAD_STOP = [3, 0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, None, [BAD]]  # sampling params whose stop string is not UTF-8


def pack(values: list[Any]) -> bytes:
    """``values`` as msgpack, every BAD string turned into invalid UTF-8 (msgpack cannot write that)."""
    return msgpack.packb(values).replace(BAD.encode(), b"\xff" * len(BAD))


NEST = b"\x91"  # a one-element array: repeated, values nested that deep


def deep_tools_frame(rid: str, depth: int) -> bytes:
    """A chat request whose tools hold a value nested ``depth`` arrays deep (msgspec's decoder
    gives up near 1000, msgpack's near 1024: between them the server's own walk must not recurse)."""
    tools = [{"type": "function", "function": Spliced(NEST * depth + b"\xc0")}]
    return raw_pack(
        [GenerateRequest.TAG, rid, None, None, [["user", "hi"]], False, None, [3, 0.0], True, tools]
    )


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
        pytest.param(deep_tools_frame("deep", 990), "deep", "tools", id="tools-nested-990-deep"),
        pytest.param(
            raw_pack([GenerateRequest.TAG, "d2", Spliced(NEST * 5000 + b"\xc0")]),
            "d2",
            "prompt",
            id="prompt-deep",
        ),
        pytest.param(generate_frame("cut")[:-3], "cut", "params", id="cut-short-in-params"),
        pytest.param(generate_frame("tr") + b"\xff", "", None, id="trailing-bytes"),  # not one msgpack value
        pytest.param(NEST * 100_000 + b"\xc0", "", None, id="nested-100000-deep"),
        pytest.param(
            raw_pack([HealthRequest.TAG, Spliced(NEST * 2000 + b"\xc0")]), "", None, id="health-deep"
        ),
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
