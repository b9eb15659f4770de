"""A seeded fuzzer of the ZeroMQ client protocol (PROTOCOL.md) against a running `tandem serve`.

Each case is one or more frames a broken or hostile client could send: random bytes, truncated
msgpack, the wrong number of frames, deep nesting, array/map/string headers that claim gigabytes,
frames over the server's size limit, a value of the wrong type in each field of each client
message (nested ones included), unknown message tags, strings that are not UTF-8. After each case
the fuzzer sends a HealthRequest on the same connection as a sentinel, so every case ends with a
reply it can wait for even when the frame itself is owed none (a Cancel of an unknown id). A request
the server accepts is cancelled at once, which keeps a case short whatever parameters it drew.

What counts against the server (`ZmqFuzzReport.failures`): a case without an answer, a reply that
does not decode or is of a kind no client message is answered with, a RequestError with code
``internal`` (the protocol's 500), a second terminal frame for one request, or a connection dropped
for a frame the size limit allows.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import msgpack
import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from tandem.messages import (
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    ClientHello,
    ErrorCode,
    Finished,
    GenerateRequest,
    Health,
    HealthRequest,
    KeepAlive,
    MessageError,
    RequestError,
    ServerHello,
    TokenDelta,
    decode,
    encode,
)

log = logging.getLogger(__name__)

CASE_TIMEOUT_S = 20.0  # generous: the machine may be shared; a healthy reply takes milliseconds
DROP_TIMEOUT_S = 5.0  # how long an oversized frame's connection may take to be dropped
SENTINEL_BASE = 1 << 40  # sentinel query ids, above anything a case draws
TERMINAL = (Finished, RequestError)
REPLY_KINDS = (ServerHello, Accepted, TokenDelta, Finished, RequestError, Health, KeepAlive)


@dataclasses.dataclass
class ZmqFuzzReport:
    """What a fuzzing run sent and what came back; ``failures`` says what the server got wrong."""

    seed: int = 0
    cases: int = 0  # cases sent
    frames: int = 0  # payload frames sent, sentinels not counted
    error_replies: int = 0  # RequestError frames received
    undecodable_replies: int = 0  # RequestError("") frames: the frame had no readable request id
    accepted: int = 0  # requests the server accepted (then cancelled)
    dropped_peers: int = 0  # connections the server dropped (oversized frames)
    internal_errors: int = 0  # RequestError with code "internal": a bug in the server
    unexpected_replies: int = 0  # frames of a kind no client message is answered with, or undecodable
    duplicate_terminals: int = 0  # a second terminal frame for one request
    unanswered: int = 0  # cases whose sentinel got no reply in time
    silent: int = 0  # cases owed a reply that got none (the sentinel's came first)
    unexpected_drops: int = 0  # connections dropped for a frame within the size limit
    kinds: dict[str, int] = dataclasses.field(default_factory=dict)  # cases per generator
    failures: list[str] = dataclasses.field(default_factory=list)  # the first few, described
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not (
            self.internal_errors
            or self.unexpected_replies
            or self.duplicate_terminals
            or self.unanswered
            or self.silent
            or self.unexpected_drops
        )

    def fail(self, text: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(text[:500])


# -- a msgpack writer that can also write what msgpack libraries refuse to ------------------------
class BadStr(bytes):
    """A msgpack str whose bytes are not valid UTF-8."""


class Raw(bytes):
    """Bytes spliced into the frame as they are (a header that claims more than follows, ...)."""


def pack(v: Any) -> bytes:
    if isinstance(v, Raw):
        return bytes(v)
    if v is None:
        return b"\xc0"
    if v is True:
        return b"\xc3"
    if v is False:
        return b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes((v,))
        if -32 <= v < 0:
            return struct.pack("b", v)
        if 0 <= v < 2**64:
            return b"\xcf" + struct.pack(">Q", v)
        return b"\xd3" + struct.pack(">q", max(-(2**63), min(v, 2**63 - 1)))
    if isinstance(v, float):
        return b"\xcb" + struct.pack(">d", v)
    if isinstance(v, BadStr):
        return b"\xdb" + struct.pack(">I", len(v)) + bytes(v)
    if isinstance(v, str):
        data = v.encode("utf-8", "surrogatepass")
        return b"\xdb" + struct.pack(">I", len(data)) + data
    if isinstance(v, bytes | bytearray):
        return b"\xc6" + struct.pack(">I", len(v)) + bytes(v)
    if isinstance(v, list | tuple):
        return b"\xdd" + struct.pack(">I", len(v)) + b"".join(pack(x) for x in v)
    if isinstance(v, dict):
        return b"\xdf" + struct.pack(">I", len(v)) + b"".join(pack(k) + pack(x) for k, x in v.items())
    raise TypeError(f"cannot pack {type(v).__name__}")


# -- the cases ------------------------------------------------------------------------------------
# The client messages and their nested ones as field lists: (name, a valid value).
VALID_PARAMS = [3, 0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 1, [], [], True, None, False, True, "", "", None]
VALID_CHAT = ["user", "hi", None, None]
CLIENT_MESSAGES: dict[int, list[Any]] = {
    ClientHello.TAG: [PROTOCOL_VERSION, "fuzz"],
    GenerateRequest.TAG: ["rid", "hi", None, None, False, None, VALID_PARAMS, True, None, None],
    Cancel.TAG: ["rid"],
    HealthRequest.TAG: [1],
}
KNOWN_TAGS = sorted(CLIENT_MESSAGES)
UNKNOWN_TAGS = [
    0,
    1,
    2,
    3,
    4,
    11,
    12,
    13,
    14,
    15,
    16,
    17,
    19,
    30,
    31,
    49,
    51,
    52,
    55,
    57,
    58,
    59,
    69,
    70,
    127,
]
UNKNOWN_TAGS += [128, 255, 256, 65535, 2**31, 2**63, 2**64 - 1, -1, -32, -33, -(2**63)]
INVALID_UTF8 = [b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"a\xe2\x82", b"\x80abc"]
FLOATS = [0.0, -1.0, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), 0.5, 1e-320]
CODEPOINTS = [97, 0, 0x2028, 0xFFFF, 0x10FFFF, 0x3C]
HUGE_HEADERS = [
    b"\xdc\xff\xff",  # array16 of 65535
    b"\xdd\xff\xff\xff\xff",  # array32 of 2^32-1
    b"\xde\xff\xff",  # map16
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\xdd\x7f\xff\xff\xff",  # array32 of 2^31-1
]


class Cases:
    """Seeded case generators: each returns the frames of one case, and says whether the server may
    drop the connection for it (a frame over the size limit)."""

    def __init__(self, rng: random.Random, max_msg_size: int) -> None:
        self.rng, self.max_msg_size = rng, max_msg_size
        self.ids = itertools.count()
        self.generators: list[tuple[str, int, Callable[[], list[bytes]]]] = [
            ("random_bytes", 8, self.random_bytes),
            ("truncated", 8, self.truncated),
            ("frame_count", 4, self.frame_count),
            ("deep_nesting", 4, self.deep_nesting),
            ("huge_header", 6, self.huge_header),
            ("wrong_type", 30, self.wrong_type),
            ("nested_wrong_type", 14, self.nested_wrong_type),
            ("unknown_tag", 6, self.unknown_tag),
            ("invalid_utf8", 10, self.invalid_utf8),
            ("field_count", 4, self.field_count),
            ("valid", 6, self.valid),
        ]
        self._weights = [w for _, w, _ in self.generators]

    def draw(self) -> tuple[str, list[bytes]]:
        if self.rng.random() < 1 / 500:
            return "oversized", [self.oversized()]
        name, _, gen = self.rng.choices(self.generators, self._weights)[0]
        return name, gen()

    # values ------------------------------------------------------------------------------
    def rid(self) -> str:
        return f"f{next(self.ids)}"

    def junk(self, depth: int = 0) -> Any:
        """Any msgpack value, valid or not in the field it lands in."""
        r = self.rng
        kind = r.randrange(14 if depth < 2 else 10)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.choice([0, 1, -1, 2**31, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), 2**64 - 1, 5, 255])
        if kind == 3:
            return r.choice(
                [0.0, -1.0, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), 0.5, 1e-320]
            )
        if kind == 4:
            return "".join(
                chr(r.choice([97, 0, 0x2028, 0xFFFF, 0x10FFFF, 0x3C])) for _ in range(r.randrange(6))
            )
        if kind == 5:
            return r.randbytes(r.randrange(8))
        if kind == 6:
            return BadStr(r.choice(INVALID_UTF8))
        if kind == 7:
            return "x" * r.choice([0, 1, 256, 257, 5000])
        if kind == 8:
            return "\ud800"  # a lone surrogate, written as the bytes ed a0 80
        if kind == 9:
            return Raw(b"\xd4\x01\x02")  # an ext type: no field takes one
        if kind == 10:
            return [self.junk(depth + 1) for _ in range(r.randrange(4))]
        if kind == 11:
            return {self.key(): self.junk(depth + 1) for _ in range(r.randrange(3))}
        if kind == 12:
            return [r.randrange(-5, 70000) for _ in range(r.randrange(6))]
        return {"type": "function", "function": {"name": self.junk(depth + 1)}}

    def key(self) -> Any:
        """A map key: msgpack allows any value, but the protocol's maps are keyed by str."""
        return self.rng.choice(["name", "", "type", 1, None, -1.5, BadStr(b"\xff"), b"k", True])

    def message(self, tag: int | None = None) -> list[Any]:
        tag = self.rng.choice(KNOWN_TAGS) if tag is None else tag
        fields = [list(f) if isinstance(f, list) else f for f in CLIENT_MESSAGES[tag]]
        if tag == GenerateRequest.TAG:
            fields[0] = self.rid()
            fields[6] = list(VALID_PARAMS)
        return [tag, *fields]

    # generators --------------------------------------------------------------------------
    def random_bytes(self) -> list[bytes]:
        n = self.rng.choice([0, 1, 2, 3, 8, 64, 512, 4096])
        data = self.rng.randbytes(n)
        if self.rng.random() < 0.5 and n:  # an array header first: gets past the first check
            data = bytes((0x90 | self.rng.randrange(16),)) + data
        return [data]

    def truncated(self) -> list[bytes]:
        frame = pack(self.message())
        return [frame[: self.rng.randrange(len(frame))]]

    def frame_count(self) -> list[bytes]:
        payload = pack(self.message())
        shapes = [
            [payload, payload],
            [b"", b"", payload],
            [b"x", payload],
            [b"", payload, b""],
            [payload] * self.rng.randrange(3, 8),
            [b""],
            [b"", b""],
        ]
        return self.rng.choice(shapes)

    def deep_nesting(self) -> list[bytes]:
        depth = self.rng.choice([100, 1000, 5000, 100_000, 1_000_000])
        opener = self.rng.choice([b"\x91", b"\x81\xa1k", b"\xdd\x00\x00\x00\x01"])
        nested = Raw(opener * depth + b"\xc0")
        msg = self.message()
        if self.rng.random() < 0.3:
            return [bytes(nested)]
        msg[self.rng.randrange(1, len(msg))] = nested
        return [pack(msg)]

    def huge_header(self) -> list[bytes]:
        header = Raw(self.rng.choice(HUGE_HEADERS) + self.rng.randbytes(self.rng.randrange(4)))
        if self.rng.random() < 0.3:
            return [bytes(header)]
        msg = self.message()
        msg[self.rng.randrange(1, len(msg))] = header
        return [pack(msg)]

    def wrong_type(self) -> list[bytes]:
        msg = self.message()
        i = self.rng.randrange(1, len(msg))
        msg[i] = self.junk()
        if msg[0] == GenerateRequest.TAG and i != 1 and self.rng.random() < 0.5:
            msg[2] = None if i != 2 else msg[2]  # the other prompt fields out of the way
        return [pack(msg)]

    def nested_wrong_type(self) -> list[bytes]:
        msg = self.message(GenerateRequest.TAG)
        if self.rng.random() < 0.6:
            params = msg[7]
            params[self.rng.randrange(len(params))] = self.junk()
        else:
            chat = list(VALID_CHAT)
            chat[self.rng.randrange(len(chat))] = self.junk()
            msg[2], msg[4] = None, [list(VALID_CHAT), chat]
        return [pack(msg)]

    def unknown_tag(self) -> list[bytes]:
        tag = self.rng.choice([*UNKNOWN_TAGS, "53", 53.0, None, True, b"\x35", [53]])
        return [pack([tag, *self.message()[1:]])]

    def invalid_utf8(self) -> list[bytes]:
        msg = self.message()
        bad = BadStr(self.rng.choice(INVALID_UTF8))
        if msg[0] == GenerateRequest.TAG:
            where = self.rng.randrange(6)
            if where == 0:
                msg[1] = bad
            elif where == 1:
                msg[2] = bad
            elif where == 2:
                msg[6] = bad  # system
            elif where == 3:
                msg[7][9] = [bad]  # a stop string
            elif where == 4:
                msg[2], msg[4] = None, [["user", bad]]
            else:
                msg[2], msg[4], msg[9] = None, [list(VALID_CHAT)], [{bad: 1}]  # a tools map key
        elif len(msg) > 1:
            msg[-1] = bad
        return [pack(msg)]

    def field_count(self) -> list[bytes]:
        msg = self.message()
        if self.rng.random() < 0.5:
            return [pack(msg[: self.rng.randrange(1, len(msg))])]  # fields missing
        return [pack(msg + [self.junk() for _ in range(self.rng.randrange(1, 40))])]  # extra fields

    def valid(self) -> list[bytes]:
        return [pack(self.message())]

    def oversized(self) -> bytes:
        msg = self.message(GenerateRequest.TAG)
        msg[2] = "x" * (self.max_msg_size + 1)
        return pack(msg)


# -- running them ---------------------------------------------------------------------------------
class Connection:
    """One DEALER peer, with a monitor that sees the server drop it."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)

    def dropped(self) -> bool:
        dropped = False
        while self.monitor.poll(0):
            recv_monitor_message(self.monitor)
            dropped = True
        return dropped

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)


class ZmqFuzzer:
    """Sends cases to ``endpoint`` and checks what comes back; ``exchange`` runs one."""

    def __init__(self, endpoint: str, report: ZmqFuzzReport | None = None) -> None:
        self.endpoint = endpoint
        self.report = report or ZmqFuzzReport()
        self.ctx = zmq.Context()
        self.conn = Connection(self.ctx, endpoint)
        self.sentinels = itertools.count(SENTINEL_BASE)
        # Requests the server accepted and was asked to cancel: each must end with one terminal
        # frame, which may come during a later case (an Accepted can follow the sentinel's Health).
        self.open_requests: set[str] = set()
        self.terminals: set[str] = set()
        self.hello = self._hello()

    def _hello(self) -> ServerHello:
        self.conn.sock.send(encode(ClientHello(PROTOCOL_VERSION, "tandem-zmq-fuzz")))
        if not self.conn.sock.poll(int(CASE_TIMEOUT_S * 1000)):
            raise TimeoutError(f"no ServerHello from {self.endpoint} within {CASE_TIMEOUT_S} s")
        hello = decode(self.conn.sock.recv())
        if not isinstance(hello, ServerHello):
            raise RuntimeError(f"expected ServerHello from {self.endpoint}, got {type(hello).__name__}")
        return hello

    def close(self) -> None:
        self.conn.close()
        self.ctx.term()

    def exchange(self, frames: list[bytes], may_drop: bool = False) -> None:
        """Send one case and wait for everything it is owed; the report counts what happened."""
        rep = self.report
        rep.cases += 1
        rep.frames += len(frames)
        if may_drop:
            self._oversized(frames)
            return
        earlier = set(self.open_requests)
        self.terminals.discard(_sent_id(frames))  # an id used again, after its request ended
        msg = _decoded(frames)
        if isinstance(msg, GenerateRequest) and msg.request_id and msg.request_id not in earlier:
            self.open_requests.add(msg.request_id)  # its terminal may come after the sentinel's Health
        self.conn.sock.send_multipart(frames)
        if not self._await_sentinel(frames, earlier) and not isinstance(msg, Cancel):
            rep.silent += 1
            rep.fail(f"no reply before the sentinel's to {_show(frames)}")

    def settle(self) -> None:
        """Wait for the terminal frames still owed to requests of earlier cases."""
        self._await_sentinel([], set(self.open_requests))

    def _await_sentinel(self, frames: list[bytes], earlier: set[str]) -> bool:
        """Send the sentinel and read until its reply and the terminal frames owed: whether a frame
        came for this case (not for an earlier case's request)."""
        rep, sock = self.report, self.conn.sock
        answered = False
        sentinel = next(self.sentinels)
        sock.send(encode(HealthRequest(sentinel)))
        open_requests, terminals = self.open_requests, self.terminals
        got_sentinel = False
        deadline = time.monotonic() + CASE_TIMEOUT_S
        while not got_sentinel or open_requests:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000)):
                rep.unanswered += 1
                rep.fail(f"no answer within {CASE_TIMEOUT_S} s to {_show(frames)}")
                self._reconnect()
                return True
            reply = self._read(sock.recv_multipart())
            if reply is None:
                continue
            if isinstance(reply, Health) and reply.query_id == sentinel:
                got_sentinel = True
                continue
            if getattr(reply, "request_id", None) not in earlier:
                answered = True
            if isinstance(reply, Accepted):
                rep.accepted += 1
                open_requests.add(reply.request_id)
                sock.send(encode(Cancel(reply.request_id)))  # keeps the case short
            elif isinstance(reply, TERMINAL):
                rid = reply.request_id
                if isinstance(reply, RequestError):
                    rep.error_replies += 1
                    rep.undecodable_replies += rid == "" and reply.code == ErrorCode.INVALID_REQUEST
                    if reply.code == ErrorCode.INTERNAL:
                        rep.internal_errors += 1
                        rep.fail(f"internal error {reply.message!r} for {_show(frames)}")
                if rid and rid in terminals and not _refused_as_in_flight(reply):
                    rep.duplicate_terminals += 1
                    rep.fail(f"second terminal frame for {rid!r}: {reply}")
                if rid:
                    terminals.add(rid)
                open_requests.discard(rid)
        if self.conn.dropped():
            rep.unexpected_drops += 1
            rep.fail(f"connection dropped after {_show(frames)}")
            self._reconnect()
        return answered

    def _read(self, reply_frames: list[bytes]) -> Any:
        rep = self.report
        try:
            reply = decode(reply_frames[-1])
        except (MessageError, msgspec.DecodeError, IndexError) as e:
            rep.unexpected_replies += 1
            rep.fail(f"reply that does not decode: {e}")
            return None
        envelope = len(reply_frames) == 2 and reply_frames[0] == b""
        if not (len(reply_frames) == 1 or envelope) or not isinstance(reply, REPLY_KINDS):
            rep.unexpected_replies += 1
            rep.fail(f"unexpected reply {type(reply).__name__} in {len(reply_frames)} frames")
            return None
        return None if isinstance(reply, KeepAlive | TokenDelta) else reply

    def _oversized(self, frames: list[bytes]) -> None:
        """A frame over the size limit on a connection of its own: the server drops that peer."""
        conn = Connection(self.ctx, self.endpoint)
        try:
            conn.sock.send_multipart(frames)
            deadline = time.monotonic() + DROP_TIMEOUT_S
            while time.monotonic() < deadline:
                if conn.monitor.poll(100):
                    self.report.dropped_peers += 1
                    return
                if conn.sock.poll(0):
                    reply = self._read(conn.sock.recv_multipart())
                    if isinstance(reply, RequestError):  # answered instead of dropped: also fine
                        self.report.error_replies += 1
                        return
            self.report.unanswered += 1
            self.report.fail(f"an oversized frame ({len(frames[0])} bytes) neither dropped nor answered")
        finally:
            conn.close()

    def _reconnect(self) -> None:
        self.conn.close()
        self.conn = Connection(self.ctx, self.endpoint)


def _decoded(frames: list[bytes]) -> Any:
    """The message the server should read from ``frames``, None when it should refuse them. Every
    case is owed a reply but a well-formed Cancel (answered, if at all, by its request's terminal)."""
    if not (len(frames) == 1 or (len(frames) == 2 and frames[0] == b"")):
        return None
    try:
        return decode(frames[-1])
    except (MessageError, RecursionError):
        return None


def _sent_id(frames: list[bytes]) -> str | None:
    """The request id a GenerateRequest frame carries by position, however broken the rest is."""
    u = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    u.feed(frames[-1])
    try:
        if u.read_array_header() > 1 and u.unpack() == GenerateRequest.TAG:
            rid = u.unpack()
            return rid if isinstance(rid, str) else None
    except Exception:  # msgpack raises several types for frames it cannot read
        pass
    return None


def _refused_as_in_flight(reply: Any) -> bool:
    return isinstance(reply, RequestError) and "in flight" in reply.message


def _show(frames: list[bytes]) -> str:
    return f"{len(frames)} frame(s) {[f[:60] for f in frames]!r}"


def fuzz_zmq(endpoint: str, cases: int, seed: int) -> ZmqFuzzReport:
    """Send ``cases`` seeded fuzz cases to the server at ``endpoint``; the report counts the outcome."""
    t0 = time.monotonic()
    report = ZmqFuzzReport(seed=seed)
    fuzzer = ZmqFuzzer(endpoint, report)
    try:
        gen = Cases(random.Random(seed), fuzzer.hello.max_msg_size or 16 * 2**20)
        for _ in range(cases):
            kind, frames = gen.draw()
            report.kinds[kind] = report.kinds.get(kind, 0) + 1
            fuzzer.exchange(frames, may_drop=kind == "oversized")
        fuzzer.settle()
    finally:
        fuzzer.close()
        report.seconds = time.monotonic() - t0
    log.info("zmq fuzz: %s", report)
    return report
