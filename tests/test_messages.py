"""The wire format PROTOCOL.md promises: tags and field order are pinned, each frame is the msgpack
array ``[tag, field0, field1, ...]`` byte for byte (a nested message is the array of its fields,
without a tag), fields are only ever appended (old frames decode in new code with defaults, new
frames in old code by ignoring what follows), and every error code has an HTTP status."""

from __future__ import annotations

from typing import Any

import msgpack
import msgspec
import pytest

from tandem import messages as m
from tandem.gateway.http.errors import _ENGINE_STATUS

# tag -> (message, its fields in wire order). A change here is a protocol change: append only.
PINNED: dict[int, tuple[str, list[str]]] = {
    1: ("Ready", ["name", "pid", "version", "info"]),
    2: ("Heartbeat", ["name", "pid", "time"]),
    3: ("ActorFailed", ["name", "pid", "error", "traceback"]),
    4: ("Stop", ["reason", "drain"]),
    10: (
        "SamplingParams",
        [
            "max_tokens",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "logprobs",
            "return_logits",
            "skip_special_tokens",
            "grammar_kind",
            "grammar",
            "prompt_logprobs",
        ],
    ),
    11: ("SubmitRequest", ["request_id", "prompt_token_ids", "params", "arrival_time"]),
    12: ("CancelRequest", ["request_id", "reason"]),
    13: (
        "TokenDelta",
        [
            "request_id",
            "token_ids",
            "text",
            "logprobs",
            "top_logprobs",
            "logits",
            "prompt_logprobs",
            "prompt_top_logprobs",
        ],
    ),
    14: (
        "Finished",
        [
            "request_id",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "cached_tokens",
            "stop_reason",
            "queued_s",
            "prefill_s",
            "decode_s",
            "tool_calls",
        ],
    ),
    15: ("RequestError", ["request_id", "code", "message", "retry_after_s"]),
    16: ("OutputBatch", ["deltas", "finished", "errors", "embeddings"]),
    17: ("StatsRequest", ["query_id"]),
    18: (
        "Stats",
        [
            "query_id",
            "worker_alive",
            "waiting",
            "running",
            "kv_blocks_total",
            "kv_blocks_used",
            "kv_blocks_cached",
            "block_size",
            "prefix_cache_hit_tokens",
            "prefix_cache_query_tokens",
            "steps",
            "prompt_tokens_total",
            "generated_tokens_total",
            "preemptions",
            "overlap",
            "step_time_ms_avg",
            "gpu_idle_ms_avg",
            "memory_plan",
            "max_queue",
            "worker_restarts",
            "step_overdue_s",
            "grammar_ms_total",
            "grammar_rows_total",
        ],
    ),
    19: ("TraceRequest", ["query_id", "since_step"]),
    20: ("StepTrace", ["query_id", "enabled", "capacity", "scheduler_pid", "worker_pid", "steps"]),
    21: ("EmbedRequest", ["request_id", "prompt_token_ids", "arrival_time"]),
    22: ("Embedding", ["request_id", "vector", "dims"]),
    30: (
        "Doorbell",
        [
            "step",
            "slot",
            "num_tokens",
            "num_seqs",
            "max_top_logprobs",
            "any_penalties",
            "all_greedy",
            "want_logits",
            "any_grammar",
            "any_prompt_logprobs",
        ],
    ),
    32: ("GrammarSpec", ["grammar_id", "kind", "text"]),
    33: ("GrammarRelease", ["grammar_id"]),
    31: (
        "StepResult",
        [
            "step",
            "slot",
            "num_sampled",
            "token_ids",
            "logprobs",
            "top_k",
            "top_ids",
            "top_logprobs",
            "logits",
            "vocab_size",
            "forward_ms",
            "idle_ms",
            "error",
            "t_start_ns",
            "t_end_ns",
            "embeddings",
            "embed_dim",
            "grammar_ms",
            "grammar_rows",
            "num_prompt_lps",
            "prompt_lps",
            "prompt_top_k",
            "prompt_top_ids",
            "prompt_top_lps",
        ],
    ),
    50: ("ClientHello", ["version", "client_name"]),
    51: (
        "ServerHello",
        [
            "version",
            "model",
            "context_length",
            "capabilities",
            "vocab_size",
            "max_inflight",
            "max_msg_size",
            "server_version",
            "revision",
        ],
    ),
    52: ("ChatMessage", ["role", "content", "tool_calls", "tool_call_id"]),
    53: (
        "GenerateRequest",
        [
            "request_id",
            "prompt",
            "prompt_token_ids",
            "messages",
            "raw",
            "system",
            "params",
            "stream",
            "tools",
            "tool_choice",
        ],
    ),
    54: ("Cancel", ["request_id"]),
    55: ("Accepted", ["request_id", "prompt_tokens", "prompt_token_ids"]),
    56: ("HealthRequest", ["query_id"]),
    57: ("Health", ["query_id", "status", "model", "error", "uptime_s", "clients", "inflight", "stats"]),
    58: ("KeepAlive", ["time"]),
    59: ("EmbedInputRequest", ["request_id", "prompt", "prompt_token_ids", "truncate"]),
}

PARAMS = m.SamplingParams(
    max_tokens=5,
    temperature=0.5,
    top_k=-1,
    top_p=0.9,
    min_p=0.1,
    repetition_penalty=1.1,
    presence_penalty=-0.5,
    frequency_penalty=0.5,
    seed=2**64 - 1,
    stop=["\n\n", "é"],
    stop_token_ids=[1, 2],
    ignore_eos=True,
    logprobs=3,
    return_logits=True,
    skip_special_tokens=False,
    prompt_logprobs=2,
)
DELTA = m.TokenDelta(
    "r1",
    [7, 300],
    "hé",
    [-0.5, -1.0],
    [[[7, -0.5], [9, -2.0]]],
    [b"\x00\x00\x80\x3f", b""],
    [-1.5],
    [[[3, -1.5], [4, -2.5]]],
)
FINISHED = m.Finished("r1", m.FinishReason.STOP, 12, 2, 4, "\n\n", 0.01, 0.2, 1.5)
ERROR = m.RequestError("r2", m.ErrorCode.BUSY, "queue full", 2.5)
STATS = m.Stats(1, True, *range(2, 14), False, 1.5, 0.25, {"kv_bytes": 1 << 40, "plan": [1, 2.5]}, 64, 1, 0.5)

# tag -> a message with every field set, most away from its default.
SAMPLES: dict[int, Any] = {
    1: m.Ready("scheduler", 4242, 1, {"vocab_size": 49152, "nested": {"ok": True, "none": None}}),
    2: m.Heartbeat("worker", 4243, 12.5),
    3: m.ActorFailed("worker", 4243, "boom", "Traceback ..."),
    4: m.Stop("shutdown", True),
    10: PARAMS,
    11: m.SubmitRequest("r1", [1, 2, 3], PARAMS, 1.25),
    12: m.CancelRequest("r1", "client gone"),
    13: DELTA,
    14: FINISHED,
    15: ERROR,
    16: m.OutputBatch(
        [DELTA, m.TokenDelta("r3", [1], "x")], [FINISHED], [ERROR], [m.Embedding("e1", bytes(8), 2)]
    ),
    17: m.StatsRequest(7),
    18: STATS,
    19: m.TraceRequest(3, 100),
    20: m.StepTrace(3, True, 1024, 11, 12, [[1, 2, 3], [4, 5, 6]]),
    21: m.EmbedRequest("e1", [1, 2, 3], 12.5),
    22: m.Embedding("e1", bytes(8), 2),
    30: m.Doorbell(1000, 3, 64, 32, 5, True, True, True, True, True),
    32: m.GrammarSpec(7, "json_schema", '{"type": "object"}'),
    33: m.GrammarRelease(7),
    31: m.StepResult(
        1000,
        3,
        2,
        bytes(16),
        bytes(8),
        1,
        bytes(16),
        bytes(8),
        b"\x01" * 70000,
        49152,
        1.5,
        0.25,
        "",
        10,
        20,
        bytes(8),
        2,
        0.75,
        3,
        2,
        bytes(8),
        1,
        bytes(16),
        bytes(8),
    ),
    50: m.ClientHello(1, "my-app"),
    51: m.ServerHello(1, "smollm2:135m", 8192, ["stream", "cancel"], 49152, 256, 16 << 20, "0.1.0", "1.1"),
    52: m.ChatMessage("user", "hi"),
    53: m.GenerateRequest(
        "r1",
        messages=[m.ChatMessage("system", "be brief"), m.ChatMessage("user", "hi")],
        params=PARAMS,
        stream=False,
    ),
    54: m.Cancel("r1"),
    55: m.Accepted("r1", 3, [1, 2, 3]),
    56: m.HealthRequest(9),
    57: m.Health(9, "degraded", "smollm2:135m", "", 12.5, 2, 3, STATS),
    58: m.KeepAlive(123.5),
    59: m.EmbedInputRequest("e1", "the quick brown fox", None, False),
}


def wire(value: Any) -> Any:
    """``value`` as PROTOCOL.md writes it: a message is the array of its fields, without a tag."""
    if isinstance(value, m.Message):
        return [wire(getattr(value, name)) for name in value.__struct_fields__]
    if isinstance(value, list):
        return [wire(v) for v in value]
    return value


def frame(tag: int, fields: list[Any]) -> bytes:
    return msgpack.packb([tag, *fields], use_bin_type=True)


def test_every_message_is_pinned_and_sampled() -> None:
    assert set(m._REGISTRY) == set(PINNED) == set(SAMPLES)


@pytest.mark.parametrize("tag", sorted(PINNED))
def test_tags_and_field_order_are_pinned(tag: int) -> None:
    name, fields = PINNED[tag]
    cls = m._REGISTRY[tag]
    assert cls.__name__ == name and cls.TAG == tag
    assert list(cls.__struct_fields__) == fields, "fields are only ever appended (and pinned here)"


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_a_frame_is_the_msgpack_array_of_tag_then_fields(tag: int) -> None:
    msg = SAMPLES[tag]
    data = m.encode(msg)
    assert data == frame(tag, wire(msg)), "byte for byte what PROTOCOL.md documents"
    back = m.decode(data)
    assert type(back) is type(msg) and back == msg


def test_literal_frames() -> None:
    # The bytes themselves, for peers written against PROTOCOL.md in other languages.
    assert m.encode(m.Cancel("r1")) == b"\x92\x36\xa2r1"
    assert m.encode(m.RequestError("r1", m.ErrorCode.BUSY, "full", 2.5)) == (
        b"\x95\x0f\xa2r1\xa4busy\xa4full\xcb\x40\x04\x00\x00\x00\x00\x00\x00"
    )
    # A nested message carries no tag: the params are a bare array (18 fields: array16, 0xdc0012).
    req = m.encode(m.GenerateRequest("r", prompt="p"))
    assert req.startswith(b"\x9b\x35\xa1r\xa1p\xc0\xc0\xc2\xc0\xdc\x00\x12\xc0\xcb")
    # 25 elements (tag + 24 fields) take the array16 header.
    assert m.encode(SAMPLES[31])[:4] == b"\xdc\x00\x19\x1f"


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_an_older_peers_shorter_frame_decodes_with_defaults(tag: int) -> None:
    cls, msg = m._REGISTRY[tag], SAMPLES[tag]
    infos = msgspec.structs.fields(cls)
    required = sum(f.required for f in infos)
    values = wire(msg)
    for n in range(required, len(infos) + 1):
        got = m.decode(frame(tag, values[:n]))
        assert type(got) is cls
        for i, f in enumerate(infos):
            want = (
                getattr(msg, f.name)
                if i < n
                else (f.default_factory() if f.default is msgspec.NODEFAULT else f.default)
            )
            assert getattr(got, f.name) == want, (n, f.name)
    if required:
        with pytest.raises(m.MessageError, match=f"malformed {cls.__name__}"):
            m.decode(frame(tag, values[: required - 1]))


def test_older_frames_of_the_protocol_history_decode() -> None:
    # A RequestError from before retry_after_s, a Stats from before step_overdue_s.
    err = m.decode(frame(15, ["r1", "busy", "queue full"]))
    assert err == m.RequestError("r1", "busy", "queue full", 0.0)
    stats = m.decode(frame(18, wire(STATS)[:20]))
    assert isinstance(stats, m.Stats) and stats.step_overdue_s == 0.0 and stats.worker_restarts == 1


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_a_newer_peers_extra_trailing_fields_are_ignored(tag: int) -> None:
    msg = SAMPLES[tag]
    future = ["a field from the future", 42, [1, {"x": None}], b"\x00"]
    assert m.decode(frame(tag, [*wire(msg), *future])) == msg


def test_extra_fields_in_nested_messages_are_ignored_too() -> None:
    params = [*wire(PARAMS), "future"]
    got = m.decode(frame(11, ["r1", [1], params, 0.5]))
    assert got.params == PARAMS


def test_nested_messages_enums_bytes_and_optionals_round_trip() -> None:
    batch = SAMPLES[16]
    back = m.decode(m.encode(batch))
    assert back == batch
    assert back.deltas[0].logits == DELTA.logits and isinstance(back.deltas[0].logits[0], bytes)
    assert back.deltas[1].logprobs is None and back.deltas[1].top_logprobs is None
    # a token id in top_logprobs stays an int (float logprobs beside it)
    assert [type(x) for x in back.deltas[0].top_logprobs[0][0]] == [int, float]
    assert back.finished[0].finish_reason == m.FinishReason.STOP == "stop"
    assert back.errors[0].code == m.ErrorCode.BUSY
    health = m.decode(m.encode(SAMPLES[57]))
    assert health.stats == STATS and m.decode(m.encode(m.Health(1, "ok", "m"))).stats is None


def test_messages_take_keyword_arguments_and_fresh_defaults() -> None:
    a, b = m.SamplingParams(), m.SamplingParams(max_tokens=3, stop=["x"])
    a.stop.append("y")
    assert m.SamplingParams().stop == [] and b.stop == ["x"] and b.max_tokens == 3
    assert m.GenerateRequest("r").params == m.SamplingParams()


def test_an_integer_where_a_float_belongs_decodes_as_that_float() -> None:
    got = m.decode(frame(15, ["r1", "busy", "full", 2]))
    assert got.retry_after_s == 2.0 and type(got.retry_after_s) is float


def test_a_tag_in_a_wider_integer_still_reads() -> None:
    # msgpack lets a peer write 13 as uint16 and a 9-element array with an array16 header.
    data = b"\xdc\x00\x09\xcd\x00\x0d" + frame(13, wire(DELTA))[2:]
    assert m.decode(data) == DELTA


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (b"\x93\x01\x02", "Ready"),  # truncated, and a pid where the name belongs
        (m.encode(m.Cancel("r1"))[:-1], "not valid msgpack"),  # truncated
        (msgpack.packb({"a": 1}), "not a tandem message"),
        (msgpack.packb("x"), "not a tandem message"),
        (msgpack.packb([]), "not a tandem message"),
        (msgpack.packb(["13", "r1"]), "not a tandem message"),
        (msgpack.packb([999, 1]), "unknown message tag 999"),
        (msgpack.packb([-1, 1]), "unknown message tag -1"),
        (m.encode(m.Cancel("r1")) + b"\x00", "not valid msgpack"),  # trailing bytes
    ],
)
def test_frames_that_are_no_message_raise_message_error(data: bytes, why: str) -> None:
    with pytest.raises(m.MessageError, match=why):
        m.decode(data)


def test_a_field_of_the_wrong_type_is_named() -> None:
    with pytest.raises(m.MessageError) as e:
        m.decode(frame(54, [5]))
    assert e.value.field == "request_id" and "Expected `str`, got `int`" in e.value.reason
    with pytest.raises(m.MessageError) as e:
        m.decode(frame(53, ["r1", "hi", None, None, False, None, [3, "hot"]]))
    assert e.value.field == "temperature" and "at `params.temperature`" in str(e.value)
    assert e.value.message_type is m.GenerateRequest and e.value.request_id == "r1"
    with pytest.raises(m.MessageError) as e:
        m.decode(frame(11, ["r2", [5, "six"], []]))
    assert e.value.field == "prompt_token_ids" and "at `prompt_token_ids[1]`" in str(e.value)
    assert e.value.request_id == "r2"  # so that the request can still be answered
    with pytest.raises(m.MessageError) as e:
        m.decode(frame(16, [[[*wire(DELTA)[:4], [[[1, "x"]]]]]]))
    assert "at `deltas[0].top_logprobs[0][0][1]`" in str(e.value) and e.value.request_id is None


def test_only_messages_encode() -> None:
    with pytest.raises(TypeError, match="not a message"):
        m.encode(object())  # type: ignore[arg-type]


def test_every_error_code_has_an_http_status() -> None:
    assert set(_ENGINE_STATUS) == set(m.ErrorCode)
