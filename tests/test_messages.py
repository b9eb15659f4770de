"""The wire format PROTOCOL.md promises: tags and field order are pinned, fields are only ever
appended (old frames decode in new code with defaults, new frames in old code by ignoring what
follows), and every error code has an HTTP status."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from tandem import messages as m
from tandem.gateway.http.errors import _ENGINE_STATUS

# tag -> (message, its fields in wire order). A change here is a protocol change: append only.
PINNED = {
    1: ("Ready", ["name", "pid", "version", "info"]),
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
        ],
    ),
    11: ("SubmitRequest", ["request_id", "prompt_token_ids", "params", "arrival_time"]),
    13: ("TokenDelta", ["request_id", "token_ids", "text", "logprobs", "top_logprobs", "logits"]),
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
        ],
    ),
    15: ("RequestError", ["request_id", "code", "message", "retry_after_s"]),
    16: ("OutputBatch", ["deltas", "finished", "errors"]),
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
        ],
    ),
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
        ],
    ),
    57: ("Health", ["query_id", "status", "model", "error", "uptime_s", "clients", "inflight", "stats"]),
}


@pytest.mark.parametrize("tag", sorted(PINNED))
def test_tags_and_field_order_are_pinned(tag: int) -> None:
    name, fields = PINNED[tag]
    cls = m._REGISTRY[tag]
    assert cls.__name__ == name
    have = [f.name for f in dataclasses.fields(cls)]
    assert have[: len(fields)] == fields, "fields are only ever appended"


def test_a_frame_is_tag_then_fields_in_order() -> None:
    frame = m.encode(m.RequestError("r1", m.ErrorCode.BUSY, "full", 2.5))
    assert msgpack.unpackb(frame) == [15, "r1", "busy", "full", 2.5]
    delta = m.encode(m.TokenDelta("r1", [7, 8], "hi"))
    assert msgpack.unpackb(delta) == [13, "r1", [7, 8], "hi", None, None, None]


def test_an_older_peers_frame_decodes_with_defaults() -> None:
    # A RequestError from before retry_after_s, a Stats from before step_overdue_s.
    err = m.decode(msgpack.packb([15, "r1", "busy", "queue full"]))
    assert err == m.RequestError("r1", "busy", "queue full", 0.0)
    stats_fields = [f for f in dataclasses.fields(m.Stats) if f.name != "step_overdue_s"]
    old = [18, *[0 if f.type in ("int", "float") else None for f in stats_fields[:17]]]
    decoded = m.decode(msgpack.packb(old))
    assert isinstance(decoded, m.Stats) and decoded.step_overdue_s == 0.0


def test_a_newer_peers_extra_fields_are_ignored() -> None:
    frame = msgpack.packb([15, "r1", "internal", "boom", 0.0, "a field from the future", 42])
    assert m.decode(frame) == m.RequestError("r1", "internal", "boom", 0.0)


def test_nested_messages_round_trip() -> None:
    batch = m.OutputBatch(
        deltas=[m.TokenDelta("a", [1], "x", logprobs=[-0.5], top_logprobs=[[[1, -0.5], [2, -1.0]]])],
        finished=[m.Finished("b", m.FinishReason.LENGTH, 3, 4, stop_reason=None)],
        errors=[m.RequestError("c", m.ErrorCode.WORKER_DIED, "gone")],
    )
    assert m.decode(m.encode(batch)) == batch


@pytest.mark.parametrize(
    "frame", [b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([999, 1]), msgpack.packb("x")]
)
def test_frames_that_are_no_message_raise_message_error(frame: bytes) -> None:
    with pytest.raises(m.MessageError):
        m.decode(frame)


def test_every_error_code_has_an_http_status() -> None:
    assert set(_ENGINE_STATUS) == set(m.ErrorCode)
