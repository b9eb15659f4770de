"""What the model pool counts a loaded model as holding: its worker's plan once it has one (the
dense copies of packed layers are not in the file's size), never less than the estimate."""

from __future__ import annotations

import pytest

from tandem.gateway.http.model_pool import resident_bytes


@pytest.mark.parametrize(
    ("ready_info", "want"),
    [
        ({}, 1000),  # not started yet: the estimate (file + KV budget)
        ({"memory_plan": {"weights_bytes": 900, "kv_cache_bytes": 600}}, 1500),  # copies: more
        ({"memory_plan": {"weights_bytes": 300, "kv_cache_bytes": 500}}, 1000),  # KV rounded down
    ],
)
def test_resident_bytes(ready_info: dict, want: int) -> None:
    assert resident_bytes(ready_info, 1000) == want
