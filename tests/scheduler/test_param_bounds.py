"""Every SamplingParams field at its bounds passes validation and packs into a real ring slot;
one past a bound is refused at the front, naming the field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tandem import validation as V
from tandem.messages import SamplingParams
from tandem.scheduler.batch import Packer
from tandem.scheduler.sequence import Sequence
from tandem.shm import RingSegment, batch_layout
from tandem.shm.slot import SlotView
from tandem.validation import INT32_MAX, InvalidParameterError, validate_sampling

_EDGE = [
    ("max_tokens", 1, 0),
    ("max_tokens", INT32_MAX, INT32_MAX + 1),
    ("temperature", 0.0, -1e-9),
    ("temperature", V.MAX_TEMPERATURE, V.MAX_TEMPERATURE * 1.0001),
    ("top_k", -(2**31), -(2**31) - 1),
    ("top_k", INT32_MAX, INT32_MAX + 1),
    ("top_p", 1e-300, 0.0),
    ("top_p", 1.0, 1.0000001),
    ("min_p", 0.0, -1e-9),
    ("min_p", 1.0, 1.0000001),
    ("repetition_penalty", 1e-300, 0.0),
    ("repetition_penalty", V.MAX_REPETITION_PENALTY, V.MAX_REPETITION_PENALTY + 1),
    ("presence_penalty", -2.0, -2.0000001),
    ("presence_penalty", 2.0, 2.0000001),
    ("frequency_penalty", -2.0, -2.0000001),
    ("frequency_penalty", 2.0, 2.0000001),
    ("seed", -(2**63), -(2**63) - 1),
    ("seed", 2**64 - 1, 2**64),
    ("logprobs", 0, -1),
    ("logprobs", V.MAX_TOP_LOGPROBS, V.MAX_TOP_LOGPROBS + 1),
    ("stop", ["x"] * V.MAX_STOP, ["x"] * (V.MAX_STOP + 1)),
    ("stop", ["y" * V.MAX_STOP_CHARS], ["y" * (V.MAX_STOP_CHARS + 1)]),
    ("stop_token_ids", [INT32_MAX], [INT32_MAX + 1]),
    ("stop_token_ids", [0] * V.MAX_STOP_TOKEN_IDS, [0] * (V.MAX_STOP_TOKEN_IDS + 1)),
]
_WRONG_TYPE = [
    ("temperature", "hot"),
    ("top_k", 1.5),
    ("top_k", True),
    ("return_logits", 300),
    ("ignore_eos", 1),
    ("skip_special_tokens", "no"),
    ("stop", "just one"),
    ("stop", ["\ud800"]),
    ("stop_token_ids", [1, "2"]),
    ("max_tokens", float("inf")),
    ("temperature", float("nan")),
]


@pytest.fixture(scope="module")
def slot() -> Iterator[SlotView]:
    ring = RingSegment.create(batch_layout(64, 4, 8, 2))
    try:
        yield ring.slot(0)
    finally:
        ring.close()
        ring.unlink()


def _seq(params: SamplingParams) -> Sequence:
    return Sequence(0, "r", 3, [1, 2, 3], params, params.seed or 0, params.max_tokens or 8)


@pytest.mark.parametrize(
    ("field", "ok", "past"), _EDGE, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(_EDGE)]
)
def test_bound_passes_and_packs_one_past_is_refused(field: str, ok: object, past: object, slot) -> None:
    params = SamplingParams(**{field: ok})
    validate_sampling(params)
    Packer.check_params(_seq(params), slot)  # the value fits its ring column
    with pytest.raises(InvalidParameterError) as e:
        validate_sampling(SamplingParams(**{field: past}))
    assert e.value.param == field


@pytest.mark.parametrize(("field", "value"), _WRONG_TYPE, ids=[f for f, _ in _WRONG_TYPE])
def test_wrong_types_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidParameterError) as e:
        validate_sampling(SamplingParams(**{field: value}))
    assert e.value.param == field


def test_unpackable_value_is_named_by_the_packing_check(slot) -> None:
    # What validation exists to prevent, if it ever let a value through.
    with pytest.raises(ValueError, match="top_k"):
        Packer.check_params(_seq(SamplingParams(top_k=2**31)), slot)
    with pytest.raises(ValueError, match="want_logits"):
        Packer.check_params(_seq(SamplingParams(return_logits=300)), slot)  # type: ignore[arg-type]
