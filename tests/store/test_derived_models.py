"""Derived models and copies in the store: the Modelfile parser, `create` / `cp` sharing the base's
file, and `rm` deleting a shared file only with its last user. The HTTP and client side is in
tests/http/test_create_copy.py."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from tandem.cli import main
from tandem.errors import ModelNotFoundError, ModelStoreError
from tandem.formats.tiny import write_tiny_gguf
from tandem.store.model_store import copy_model, create_model, list_models, remove_model, resolve_model
from tandem.store.modelfile import ModelDefaults, ModelfileError, parse_modelfile
from tandem.store.registry import ModelRef, data_dir, now, write_manifest

MODELFILE = '''# a pirate
FROM base
SYSTEM """You are
a pirate."""
PARAMETER temperature 0.2
PARAMETER stop "<|im_end|>"
PARAMETER stop END
PARAMETER num_ctx 512
MESSAGE user hello
MESSAGE assistant """Arr,
matey."""
'''


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def base() -> ModelRef:
    """A model the store owns (as a pull leaves it): its file under the store's data folder."""
    data_dir("base").mkdir(parents=True)
    path = write_tiny_gguf(data_dir("base") / "base.gguf")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    ref = ModelRef(
        "base:latest", path, "gguf", path.stat().st_size, digest, "catalogue:test", now(), owned=True
    )
    write_manifest(ref)
    return ref


# -- the Modelfile ---------------------------------------------------------------------------------


def test_modelfile_instructions_parse_into_typed_defaults() -> None:
    name, d = parse_modelfile(MODELFILE)
    assert name == "base" and d.base == "base"
    assert d.system == "You are\na pirate."
    assert d.parameters == {"temperature": 0.2, "stop": ["<|im_end|>", "END"], "num_ctx": 512}
    assert d.messages == (
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Arr,\nmatey."},
    )
    assert parse_modelfile(d.modelfile())[1] == d  # what `show` prints creates the same model


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("SYSTEM hi\n", "no FROM"),
        ("FROM base\nADAPTER ./lora.gguf\n", "line 2: ADAPTER"),
        ("FROM base\nPARAMETER mirostat 2\n", "unknown parameter 'mirostat'"),
        ("FROM base\nPARAMETER top_k lots\n", "'top_k' takes an integer"),
        ("FROM base\nMESSAGE tool hi\n", r"messages\[0\]"),
        ('FROM base\nSYSTEM """never closed\n', "never closed"),
        ("FROM base\n!!\n", "line 2: expected an instruction"),
    ],
)
def test_bad_modelfiles_are_refused_naming_the_problem(text: str, names: str) -> None:
    with pytest.raises(ModelfileError, match=names):
        parse_modelfile(text)


# -- create, copy, remove --------------------------------------------------------------------------


def test_create_shares_the_base_file_and_flattens_a_derived_base(base: ModelRef) -> None:
    _, defaults = parse_modelfile(MODELFILE)
    pirate = create_model("pirate", defaults)
    defaults = dataclasses.replace(defaults, base="base:latest")  # FROM names the stored model
    assert pirate.path == base.path and not pirate.owned and pirate.defaults == defaults
    assert resolve_model("pirate").defaults == defaults
    louder = create_model("louder", ModelDefaults(base="pirate", parameters={"temperature": 1.5}))
    assert louder.defaults is not None and louder.defaults.base == "base:latest"
    assert louder.defaults.parameters["temperature"] == 1.5 and louder.defaults.system == defaults.system
    assert [r.name for r in list_models()] == ["base:latest", "louder:latest", "pirate:latest"]


def test_a_pulled_model_is_never_overwritten_by_create_or_copy(base: ModelRef) -> None:
    with pytest.raises(ModelStoreError, match="already exists"):
        create_model("base", ModelDefaults(base="base"))
    with pytest.raises(ModelStoreError, match="already exists"):
        copy_model("base", "base:latest")
    with pytest.raises(ModelNotFoundError):
        create_model("orphan", ModelDefaults(base="nothing-here"))


def test_a_shared_file_goes_with_its_last_user_only(base: ModelRef) -> None:
    copy_model("base", "twin")
    create_model("pirate", ModelDefaults(base="base", system="Arr"))
    remove_model("base")  # the first owner goes, its file stays for the others
    assert base.path.exists() and resolve_model("twin").path == base.path
    remove_model("pirate")
    assert base.path.exists()
    remove_model("twin")  # the last user: the file and its folder go
    assert not base.path.exists() and not base.path.parent.exists()
    assert list_models() == []


def test_cli_create_and_cp(base: ModelRef, tmp_path: Path) -> None:
    mf = tmp_path / "Modelfile"
    mf.write_text(MODELFILE)
    runner = CliRunner()
    r = runner.invoke(main, ["create", "pirate", "-f", str(mf)])
    assert r.exit_code == 0 and "created 'pirate:latest' from 'base:latest'" in r.output, r.output
    r = runner.invoke(main, ["cp", "pirate", "pirate2"])
    assert r.exit_code == 0 and resolve_model("pirate2").defaults == resolve_model("pirate").defaults
    r = runner.invoke(main, ["show", "pirate"])
    assert r.exit_code == 0 and "Modelfile" in r.output and 'SYSTEM """You are' in r.output
    bad = tmp_path / "Bad"
    bad.write_text("FROM base\nPARAMETER mirostat 1\n")
    r = runner.invoke(main, ["create", "x", "-f", str(bad)])
    assert r.exit_code == 1 and "unknown parameter 'mirostat'" in r.output
