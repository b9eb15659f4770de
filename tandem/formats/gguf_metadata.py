"""Read a GGUF file's key/value metadata as plain Python values.

`gguf.GGUFReader` builds a numpy view per array element and parses every tensor descriptor, which
takes seconds for a 49k-token vocabulary. The metadata section is a simple length-prefixed format at
the start of the file, so we parse it directly (same layout and value-type codes as `gguf`).

Every count and length is checked against the bytes left before it is trusted, so a corrupt or
hostile header fails at once with a ModelFileError naming the problem (never quoting the file).
"""

from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType

from tandem.errors import ModelFileError, quoted
from tandem.formats.file_access import open_regular

if TYPE_CHECKING:
    from gguf import GGUFReader

logger = logging.getLogger(__name__)

# Scalar value types: struct code and numpy dtype (little-endian; swapped for big-endian files).
_SCALARS: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("B", "u1"),
    GGUFValueType.INT8: ("b", "i1"),
    GGUFValueType.UINT16: ("H", "u2"),
    GGUFValueType.INT16: ("h", "i2"),
    GGUFValueType.UINT32: ("I", "u4"),
    GGUFValueType.INT32: ("i", "i4"),
    GGUFValueType.FLOAT32: ("f", "f4"),
    GGUFValueType.BOOL: ("?", "?"),
    GGUFValueType.UINT64: ("Q", "u8"),
    GGUFValueType.INT64: ("q", "i8"),
    GGUFValueType.FLOAT64: ("d", "f8"),
}

_SUPPORTED_VERSIONS = (2, 3)
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
_PAST_END = "runs past the end of the file (truncated or corrupt header)"
_MAX_ARRAY_NESTING = 4  # nested arrays are legal but unused by known models; bounds the recursion


class _Cursor:
    """Sequential reader over the mapped file; `order` is '<' or '>'. Reads past the end, or counts
    that cannot fit in what is left, raise ModelFileError."""

    def __init__(self, buf: mmap.mmap, order: str, offset: int, path: Path) -> None:
        self.buf = buf
        self.order = order
        self.pos = offset
        self.path = path

    def error(self, problem: str) -> ModelFileError:
        return ModelFileError(self.path, problem)

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def scalar(self, code: str) -> Any:
        fmt = self.order + code
        size = struct.calcsize(fmt)
        if size > self.left:
            raise self.error(f"truncated: the file ends inside its header (at byte {len(self.buf)})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str = "a string") -> str:
        n = self.scalar("Q")
        if n > self.left:
            raise self.error(
                f"{what} at byte {self.pos - 8} claims {n} bytes, but only {self.left} are left "
                "(truncated or corrupt header)"
            )
        # Vocab entries from odd converters are not always valid UTF-8; keep going rather than fail.
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value_type(self, what: str) -> GGUFValueType:
        code = self.scalar("I")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.error(f"{what} has unknown value type {code} (corrupt header)") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(f"the value of {what}")
        if vtype == GGUFValueType.ARRAY:
            etype = self.value_type(f"an array element of {what}")
            count = self.scalar("Q")
            return self.array(etype, count, what, depth)
        code, _ = _SCALARS[vtype]
        return self.scalar(code)

    def array(self, etype: GGUFValueType, count: int, what: str, depth: int) -> list[Any]:
        if etype in _SCALARS:
            _, dtype = _SCALARS[etype]
            dt = np.dtype(dtype).newbyteorder(self.order)
            nbytes = dt.itemsize * count
            if nbytes > self.left:
                raise self.error(f"the array {what} of {count} values {_PAST_END}")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += nbytes
            return arr.tolist()
        if count * 8 > self.left:  # each element needs at least its 8-byte length or header
            raise self.error(f"the array {what} of {count} values {_PAST_END}")
        if etype == GGUFValueType.STRING:
            return self._strings(count, what)
        if depth >= _MAX_ARRAY_NESTING:
            raise self.error(f"the array {what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        return [self.value(etype, what, depth + 1) for _ in range(count)]

    def _strings(self, count: int, what: str) -> list[str]:
        # Hot loop for vocabularies: inline the length read instead of calling string().
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        fmt = struct.Struct(self.order + "Q")
        unpack, size = fmt.unpack_from, fmt.size
        append = out.append
        for _ in range(count):
            if pos + size > end:
                raise self.error(f"the string array {what} {_PAST_END}")
            (n,) = unpack(buf, pos)
            pos += size
            append(buf[pos : pos + n].decode("utf-8", errors="replace"))
            pos += n
        if pos > end:
            raise self.error(f"the string array {what} {_PAST_END}")
        self.pos = pos
        return out


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file: strings decoded, arrays as lists.

    Also records the header as `GGUF.version`, `GGUF.tensor_count` and `GGUF.kv_count`, the
    pseudo-keys `gguf.GGUFReader` exposes.
    """
    path = Path(path)
    buf = map_file(path)
    try:
        return parse_header(buf, path)[0]
    finally:
        buf.close()


def map_file(path: Path) -> mmap.mmap:
    """A read-only map of a regular file (refused before it is opened otherwise)."""
    with open_regular(path) as f:
        try:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # a zero-length file cannot be mapped
            raise ModelFileError(path, "not a GGUF file (it is empty)") from None


def parse_header(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], _Cursor]:
    """Metadata, plus a cursor left at the tensor descriptors that follow it."""
    if len(buf) < 4 or buf[:4] != struct.pack("<I", GGUF_MAGIC):
        raise ModelFileError(path, "not a GGUF file (no GGUF magic number at its start)")
    if len(buf) < _HEADER_BYTES:
        raise ModelFileError(path, f"truncated: {len(buf)} bytes, shorter than a GGUF header")
    order, version = _byte_order(buf, path)
    cur = _Cursor(buf, order, 8, path)
    tensor_count = cur.scalar("Q")
    kv_count = cur.scalar("Q")
    _check_counts(cur, tensor_count, kv_count)
    out: dict[str, Any] = {
        "GGUF.version": version,
        "GGUF.tensor_count": tensor_count,
        "GGUF.kv_count": kv_count,
    }
    for i in range(kv_count):
        key = cur.string(f"the key of metadata entry {i}")
        if key in out:
            raise cur.error(f"metadata entry {i} repeats the key {quoted(key)}")
        what = f"metadata entry {i} ({quoted(key)})"
        out[key] = cur.value(cur.value_type(what), what)
    logger.debug("read %d metadata keys from %s", kv_count, path)
    return out, cur


def _byte_order(buf: mmap.mmap, path: Path) -> tuple[str, int]:
    (little,) = struct.unpack_from("<I", buf, 4)
    (big,) = struct.unpack_from(">I", buf, 4)
    # A big-endian file shows a byte-swapped version number when read little-endian.
    for order, version in (("<", little), (">", big)):
        if version in _SUPPORTED_VERSIONS:
            return order, version
    if 1 in (little, big):
        raise ModelFileError(path, "GGUF version 1 is not supported (convert the model again)")
    raise ModelFileError(path, f"unsupported GGUF version {little} (tandem reads versions 2 and 3)")


def _check_counts(cur: _Cursor, tensor_count: int, kv_count: int) -> None:
    # Before any loop trusts them: a count the rest of the file cannot hold is a corrupt header.
    if kv_count * _MIN_KV_BYTES > cur.left:
        raise cur.error(
            f"its header claims {kv_count} metadata entries, more than the {cur.left} bytes after it "
            "can hold (truncated or corrupt header)"
        )
    if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise cur.error(
            f"its header claims {tensor_count} tensors, more than the {cur.left} bytes after it "
            "can describe (truncated or corrupt header)"
        )


def metadata_from_reader(reader: GGUFReader) -> dict[str, Any]:
    """The same dict as `read_gguf_metadata`, from an already opened `gguf.GGUFReader`."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            etype = field.types[-1] if len(field.types) > 1 else None
            if etype == GGUFValueType.STRING:
                out[key] = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
            elif etype is not None and etype in _SCALARS:
                out[key] = [field.parts[i].tolist()[0] for i in field.data]
            else:
                out[key] = field.contents()
        elif field.types[0] == GGUFValueType.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            out[key] = field.parts[field.data[0]].tolist()[0]
    return out
