"""Read a GGUF file's key/value metadata as plain Python values.

`gguf.GGUFReader` builds a numpy view per array element and parses every tensor descriptor, which
takes seconds for a 49k-token vocabulary. The metadata section is a simple length-prefixed format at
the start of the file, so we parse it directly (same layout and value-type codes as `gguf`).
"""

from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGUF_MAGIC, GGUFValueType

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


class GGUFMetadataError(ValueError):
    """The file is not a GGUF file, or its metadata section is malformed."""


class _Cursor:
    """Sequential reader over the mapped file; `order` is '<' or '>'."""

    def __init__(self, buf: mmap.mmap, order: str, offset: int) -> None:
        self.buf = buf
        self.order = order
        self.pos = offset

    def scalar(self, code: str) -> Any:
        fmt = self.order + code
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise GGUFMetadataError(f"string of {n} bytes runs past the end of the file")
        # Vocab entries from odd converters are not always valid UTF-8; keep going rather than fail.
        s = self.buf[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype = GGUFValueType(self.scalar("I"))
            count = self.scalar("Q")
            return self.array(etype, count)
        code, _ = _SCALARS[vtype]
        return self.scalar(code)

    def array(self, etype: GGUFValueType, count: int) -> list[Any]:
        if etype in _SCALARS:
            _, dtype = _SCALARS[etype]
            dt = np.dtype(dtype).newbyteorder(self.order)
            nbytes = dt.itemsize * count
            if self.pos + nbytes > len(self.buf):
                raise GGUFMetadataError("array runs past the end of the file")
            arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
            self.pos += nbytes
            return arr.tolist()
        if etype == GGUFValueType.STRING:
            # Hot loop for vocabularies: inline the length read instead of calling string().
            buf, pos, out = self.buf, self.pos, []
            fmt = struct.Struct(self.order + "Q")
            unpack, size = fmt.unpack_from, fmt.size
            append = out.append
            for _ in range(count):
                (n,) = unpack(buf, pos)
                pos += size
                append(buf[pos : pos + n].decode("utf-8", errors="replace"))
                pos += n
            if pos > len(buf):
                raise GGUFMetadataError("string array runs past the end of the file")
            self.pos = pos
            return out
        # Nested arrays are legal in the format but unused by known models; keep them as lists.
        return [self.value(etype) for _ in range(count)]


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file: strings decoded, arrays as lists.

    Also records the header as `GGUF.version`, `GGUF.tensor_count` and `GGUF.kv_count`, the
    pseudo-keys `gguf.GGUFReader` exposes.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as e:  # empty file
            raise GGUFMetadataError(f"{path}: not a GGUF file (empty)") from e
    try:
        return _parse(buf, path)
    except (struct.error, ValueError) as e:
        if isinstance(e, GGUFMetadataError):
            raise
        raise GGUFMetadataError(f"{path}: malformed GGUF metadata: {e}") from e
    finally:
        buf.close()


def _parse(buf: mmap.mmap, path: Path) -> dict[str, Any]:
    return parse_header(buf, path)[0]


def parse_header(buf: mmap.mmap, path: Path) -> tuple[dict[str, Any], _Cursor]:
    """Metadata, plus a cursor left at the tensor descriptors that follow it."""
    if len(buf) < 24:
        raise GGUFMetadataError(f"{path}: not a GGUF file (too short)")
    (magic,) = struct.unpack_from("<I", buf, 0)
    if magic != GGUF_MAGIC:
        raise GGUFMetadataError(f"{path}: not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", buf, 4)
    order = "<"
    # A big-endian file shows a byte-swapped version number when read little-endian.
    if version & 0xFFFF == 0:
        order = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version == 1:
        raise GGUFMetadataError(f"{path}: GGUF version 1 is not supported")
    cur = _Cursor(buf, order, 8)
    tensor_count = cur.scalar("Q")
    kv_count = cur.scalar("Q")
    out: dict[str, Any] = {
        "GGUF.version": version,
        "GGUF.tensor_count": tensor_count,
        "GGUF.kv_count": kv_count,
    }
    for _ in range(kv_count):
        key = cur.string()
        vtype = cur.scalar("I")
        out[key] = cur.value(vtype)
    logger.debug("read %d metadata keys from %s", kv_count, path)
    return out, cur


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
