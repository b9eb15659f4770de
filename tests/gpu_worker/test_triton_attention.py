"""The Triton paged decode kernel against SDPA, on the CPU through Triton's interpreter.

Triton is in the `test` extra, so this runs wherever the suite runs; a missing Triton fails here
rather than skipping, so the kernel is never silently unchecked. The compiled kernel is checked
on a GPU by test_gpu_launch.py with the same cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("triton_cases.py")


def test_kernel_matches_sdpa_under_the_interpreter() -> None:
    import triton  # noqa: F401  (an ImportError here means: pip install -e '.[test]')

    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, str(CASES), "cpu"], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok 6 cases" in proc.stdout, proc.stdout
