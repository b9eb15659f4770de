"""The stress and fault suite: every test here is marked `stress` and runs with real processes.

CI runs the bounded version (`TANDEM_STRESS_SCALE` unset, i.e. 1). A larger scale multiplies the
counts and durations the tests draw from `stress_scale` (`tandem stress` runs the long version).
Load and fault tests talk to loopback addresses only and stop by themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.stress)


@pytest.fixture(scope="session")
def stress_scale() -> float:
    """How much longer than the CI-bounded run to go: counts and durations are multiplied by it."""
    return float(os.environ.get("TANDEM_STRESS_SCALE", "1"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random llama the HTTP tests serve (tests/http/conftest.py has its twin)."""
    from live_server import TINY_CONTEXT

    from tandem.formats.tiny import TinySpec, write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny.gguf", TinySpec(context=TINY_CONTEXT))
