"""Model names and references that must never become a path outside the store: `../`, absolute
paths, separators and over-long parts are refused by name validation, text that cannot be a path is a
store error (not an OSError), and tags never nest inside another model's folder (moved here from
tests/store/test_store.py; tests/stress/test_http_security.py tries the same over HTTP).

Run: python -m pytest tests/stress/test_store_paths.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.errors import InvalidModelNameError, ModelStoreError
from tandem.store import registry
from tandem.store.model_store import ensure_model, pull_model, resolve_model


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    return tmp_path / "home"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [("Llama3.2", "llama3.2:latest"), ("a/b:c", "a/b:c"), ("h.io/ns/m:1b-q4_0", "h.io/ns/m:1b-q4_0")],
)
def test_names_are_normalised(raw: str, normal: str):
    assert registry.normalize_name(raw) == normal


@pytest.mark.parametrize("bad", ["", "a b", "../x", "a/b/c/d", "x:", ":tag", "-x", "a:b:c"])
def test_bad_names_are_refused(bad: str):
    with pytest.raises(InvalidModelNameError):
        registry.normalize_name(bad)


def test_a_name_part_longer_than_a_file_name_allows_is_a_name_error():
    with pytest.raises(InvalidModelNameError, match="at most 80 characters"):
        registry.normalize_name("a" * 300)
    with pytest.raises(InvalidModelNameError, match="at most 80 characters"):
        registry.normalize_name("ns/m:" + "t" * 81)
    assert registry.normalize_name("a" * 80) == "a" * 80 + ":latest"
    assert len(registry.slug("Model-" * 50)) <= registry.MAX_NAME_PART


@pytest.mark.parametrize("ref", ["~no-such-user-here/m", "a" * 300, "a" * 300 + ".gguf"])
def test_text_that_cannot_be_a_path_or_name_is_a_store_error(ref: str):
    """Not the OSError or RuntimeError that probing it as a path raises."""
    with pytest.raises(ModelStoreError):
        pull_model(ref, progress=False)
    with pytest.raises(ModelStoreError):
        resolve_model(ref)
    with pytest.raises(ModelStoreError):
        ensure_model(ref)


def test_tags_never_nest_inside_another_models_folder():
    assert registry.data_dir("a:b") != registry.data_dir("a/b:c")
    assert registry.data_dir("a/b:c").parent == registry.data_dir("a:b").parent / "a"


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "a/../b",
        "..",
        ".",
        "a/./b",
        "a\\b",
        "a\x00b",
        "%2e%2e/x",
        "a/b/c/d/e",
    ],
)
def test_traversal_names_never_name_a_store_path(bad: str):
    """Each is refused by name, or (a URL-encoded form is plain text to the store) stays inside it."""
    try:
        name = registry.normalize_name(bad)
    except InvalidModelNameError:
        return
    assert registry.data_dir(name).resolve().is_relative_to(registry.models_dir().resolve()), (bad, name)
