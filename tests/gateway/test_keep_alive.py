"""ollama's keep_alive forms, as the gateway reads them."""

from __future__ import annotations

import pytest

from tandem.gateway.http.errors import ApiError
from tandem.gateway.http.model_pool import parse_keep_alive


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("10s", 10.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        ("0", 0.0),
        ("0s", 0.0),
        (0, 0.0),
        (30, 30.0),
        (2.5, 2.5),
        ("45", 45.0),
        (-1, None),
        ("-1", None),
        ("-1m", None),
    ],
)
def test_forms(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["", "soon", "5 m", "5mm", "m", True, None, [1], {"m": 5}])
def test_bad_values_are_a_400_naming_the_field(value: object) -> None:
    with pytest.raises(ApiError) as e:
        parse_keep_alive(value)
    assert e.value.status == 400 and e.value.param == "keep_alive"
