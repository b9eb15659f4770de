"""Broken and hostile model files: `pull` refuses each with one line naming the problem (never the
file's bytes), nothing ever blocks on a FIFO or device, and `tandem generate` / `tandem serve` on a
broken file exit non-zero with one line on stderr (the real CLI, as a subprocess).

Run: python -m pytest tests/stress/test_bad_model_files.py -v
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf_damage import BROKEN, SWAPPED, tiny_bytes, write_broken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.cli import main
from tandem.errors import ModelFileError, ModelStoreError, UnsupportedModelError
from tandem.formats.gguf_file import GGUFFile
from tandem.formats.loader import load_gguf, load_safetensors_dir
from tandem.paths import models_dir
from tandem.store.model_store import list_models, pull_model
from tandem.store.registry import lock_path
from tandem.tokenizer.model_files import read_config_and_tokenizer


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return tiny_bytes(tmp_path_factory.mktemp("valid"))


def assert_one_line(message: str, *fragments: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def assert_nothing_registered(home: Path) -> None:
    assert list_models() == []
    leftovers = [p for p in home.rglob("*") if p.is_file()] if home.exists() else []
    assert leftovers == [], leftovers  # no manifest, and no lock file either


@pytest.mark.parametrize("damage", sorted(BROKEN))
def test_pull_refuses_a_broken_gguf_naming_the_problem(tmp_path: Path, home: Path, valid: bytes, damage: str):
    path = write_broken(tmp_path, damage, valid)

    with pytest.raises(ModelFileError) as err:
        pull_model(str(path), progress=False)

    assert_one_line(str(err.value), str(path), BROKEN[damage][1])
    assert_nothing_registered(home)


@pytest.mark.parametrize("damage", ["truncated", "bad_magic", "huge_string_length", "tensor_dims"])
def test_cli_pull_of_a_broken_gguf_is_one_line(tmp_path: Path, valid: bytes, damage: str):
    path = write_broken(tmp_path, damage, valid)
    result = CliRunner().invoke(main, ["pull", str(path)])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert BROKEN[damage][1] in result.stderr


@pytest.fixture(scope="module")
def header_bytes(tmp_path_factory: pytest.TempPathFactory, valid: bytes) -> int:
    """How many leading bytes of `valid` are header and tensor table (where every count lives)."""
    path = tmp_path_factory.mktemp("header") / "valid.gguf"
    path.write_bytes(valid)
    return min(t.offset for t in GGUFFile(path).tensors.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=4))
def test_any_corrupt_header_byte_is_a_one_line_error_or_still_loads(
    valid: bytes, header_bytes: int, tmp_path: Path, edits: list[tuple[int, int]]
):
    data = bytearray(valid)
    for at, value in edits:
        data[at % header_bytes] = value
    scratch = tmp_path / f"corrupt-{os.urandom(6).hex()}.gguf"  # a new file: earlier maps stay valid
    scratch.write_bytes(bytes(data))
    try:
        read_config_and_tokenizer(scratch)
    except (ModelStoreError, UnsupportedModelError) as e:  # what the CLI prints as one `Error:` line
        assert_one_line(str(e))
    finally:
        scratch.unlink()


def test_errors_never_quote_the_file(tmp_path: Path):
    secret = tmp_path / "secret.gguf"
    secret.write_bytes(b"hunter2 is the password\n")
    with pytest.raises(ModelFileError) as err:
        pull_model(str(secret), progress=False)
    assert "hunt" not in str(err.value) and "not a GGUF file" in str(err.value)
    result = CliRunner().invoke(main, ["show", str(secret)])
    assert result.exit_code == 1 and "hunt" not in result.stderr and "not a GGUF file" in result.stderr


def _finishes(fn, timeout: float = 10.0) -> BaseException | None:
    """What fn raised, run in a daemon thread: a call that blocks (old code on a FIFO) fails the test
    instead of hanging it."""
    box: list[BaseException | None] = []

    def target() -> None:
        try:
            fn()
            box.append(None)
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert box, f"still blocked after {timeout} s"
    return box[0]


def test_fifos_devices_and_proc_entries_are_refused_without_opening_them(tmp_path: Path, home: Path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    read_end, write_end = os.pipe()
    try:
        refused = {
            str(fifo): "is a FIFO, not a regular file",
            "/dev/zero": "is a device, not a regular file",
            f"/proc/self/fd/{read_end}": "is a /proc or /sys entry",
            "/proc/self/environ": "is a /proc or /sys entry",
        }
        for path, problem in refused.items():
            error = _finishes(lambda p=path: pull_model(p, progress=False))
            assert isinstance(error, ModelFileError), (path, error)
            assert_one_line(str(error), problem)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert_nothing_registered(home)


def test_a_wrong_tensor_shape_is_found_at_load_naming_tensor_and_shapes(tmp_path: Path, valid: bytes):
    path = write_broken(tmp_path, "swapped", valid)
    pull_model(str(path), progress=False)  # a sound GGUF file: only the model config says it is wrong

    for load in (load_gguf, read_config_and_tokenizer):
        with pytest.raises(ModelFileError) as err:
            load(path)
        assert_one_line(str(err.value), f"tensor {SWAPPED} has shape [64, 128]", "needs [128, 64]")


def test_a_corrupt_layer_count_fails_at_the_first_missing_layer(tmp_path: Path, valid: bytes):
    path = write_broken(tmp_path, "huge_block_count", valid)
    pull_model(str(path), progress=False)  # the metadata value is well-formed; only loading needs it

    error = _finishes(lambda: read_config_and_tokenizer(path))
    assert isinstance(error, ModelFileError), error
    assert_one_line(str(error), "lacks the tensor blk.2.attn_norm.weight", "2147483648 layers")


def test_a_safetensors_tensor_of_the_wrong_shape_is_found_at_load(tmp_path: Path):
    from safetensors.numpy import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
        "tie_word_embeddings": True,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    layer = {  # down_proj is (16, 8) where the config needs (8, 16)
        "input_layernorm.weight": (8,), "post_attention_layernorm.weight": (8,),
        "self_attn.q_proj.weight": (8, 8), "self_attn.k_proj.weight": (4, 8),
        "self_attn.v_proj.weight": (4, 8), "self_attn.o_proj.weight": (8, 8),
        "mlp.gate_proj.weight": (16, 8), "mlp.up_proj.weight": (16, 8), "mlp.down_proj.weight": (16, 8),
    }  # fmt: skip
    tensors = {f"model.layers.0.{k}": np.zeros(s, np.float32) for k, s in layer.items()}
    tensors["model.embed_tokens.weight"] = np.zeros((16, 8), np.float32)
    tensors["model.norm.weight"] = np.ones(8, np.float32)
    save_file(tensors, folder / "model.safetensors")

    with pytest.raises(ModelFileError) as err:
        load_safetensors_dir(folder)
    assert_one_line(str(err.value), "tensor blk.0.ffn_down.weight has shape [16, 8]", "needs [8, 16]")


def test_a_truncated_safetensors_shard_is_refused_at_pull(tmp_path: Path):
    from safetensors.numpy import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    save_file({"x": np.zeros((64, 64), np.float32)}, folder / "model.safetensors")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])

    with pytest.raises(ModelStoreError) as err:
        pull_model(str(folder), progress=False)
    assert_one_line(str(err.value), "'x' extends past the end of the file")


def test_lock_files_do_not_outlive_a_pull(tmp_path: Path, valid: bytes):
    good = tmp_path / "good.gguf"
    good.write_bytes(valid)
    ref = pull_model(str(good), progress=False)
    assert not lock_path(ref.name).exists()
    assert not any((models_dir() / "locks").iterdir())


# --- the real CLI: generate and serve on broken files --------------------------------------------


def _tandem(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TANDEM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_cli_one_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert_one_line(proc.stderr, *fragments)


@pytest.mark.parametrize("damage", ["truncated", "huge_kv_count", "tensor_dims", "swapped"])
def test_generate_on_a_broken_file_is_one_line(tmp_path: Path, home: Path, valid: bytes, damage: str):
    path = write_broken(tmp_path, damage, valid)
    fragment = "has shape [64, 128]" if damage == "swapped" else BROKEN[damage][1]
    proc = _tandem(home, "generate", "--model", str(path), "--max-tokens", "2", "hi")
    assert_cli_one_line(proc, str(path), fragment)


def test_generate_on_a_model_broken_after_its_pull_is_one_line(tmp_path: Path, home: Path, valid: bytes):
    path = tmp_path / "later.gguf"
    path.write_bytes(valid)
    pull_model(str(path), progress=False)
    path.write_bytes(BROKEN["tensor_offset_past_end"][0](valid))  # the user's file, changed since

    proc = _tandem(home, "generate", "--model", "later", "--max-tokens", "2", "hi")
    assert_cli_one_line(proc, "extends past the end of the file")


def test_serve_on_a_broken_file_is_one_line(tmp_path: Path, home: Path, valid: bytes):
    path = write_broken(tmp_path, "swapped", valid)
    proc = _tandem(home, "serve", "--model", str(path), "--port", "0", "--kv-cache-memory", "16M")
    assert_cli_one_line(proc, f"tensor {SWAPPED} has shape [64, 128]")
