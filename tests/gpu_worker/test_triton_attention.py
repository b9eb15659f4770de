"""The Triton paged decode kernel against SDPA, on the CPU through Triton's interpreter.

Triton is in the `test` extra wherever it has wheels (Linux x86_64), so there this test runs and
a missing Triton fails it: the kernel is never silently unchecked. Only where no Triton wheel
exists at all is it skipped, saying so. The compiled kernel is checked on a GPU by
test_gpu_launch.py with the same cases.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).with_name("triton_cases.py")


def _require_triton() -> None:
    try:
        import triton  # noqa: F401
    except ImportError:
        if platform.system() == "Linux" and platform.machine() == "x86_64":
            raise  # installable here: pip install -e '.[test]'
        pytest.skip(f"NO TRITON WHEEL for {platform.system()} {platform.machine()}: kernel not checked")


def test_kernel_matches_sdpa_under_the_interpreter() -> None:
    _require_triton()
    # A child process: Triton reads TRITON_INTERPRET once, when it is first imported.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(CASES), "cpu"], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok 6 cases" in proc.stdout, proc.stdout
