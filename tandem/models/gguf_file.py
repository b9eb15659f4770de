"""A fast GGUF reader: metadata as plain Python values, tensors as zero-copy numpy views.

gguf.GGUFReader builds one object per array element (about 3 s for a 49k-token vocab on
this machine); reading the header ourselves with struct and memoryview takes tens of
milliseconds, which is most of the load-time budget saved.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tandem.models.config import UnsupportedModelError

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF value type id -> (struct format, size); 8 = string, 9 = array.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_NUMPY_OF: dict[int, str] = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
    12: "<f8",
}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file we can parse."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy/torch order: the reverse of GGUF's ne
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


class GGUFFile:
    """Parsed header of a GGUF file plus a read-only memory map of its tensor data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._map)
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # -- primitive readers -------------------------------------------------------------
    def _unpack(self, fmt: str, size: int) -> Any:
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += size
        return value

    def _string(self) -> str:
        n = self._unpack("<Q", 8)
        raw = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return raw.decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._unpack(*_SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            item_type = self._unpack("<I", 4)
            count = self._unpack("<Q", 8)
            if item_type in _NUMPY_OF:
                dtype = np.dtype(_NUMPY_OF[item_type])
                arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
                self._pos += count * dtype.itemsize
                return arr.tolist()
            if item_type == 8:
                return [self._string() for _ in range(count)]
            return [self._value(item_type) for _ in range(count)]
        raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype} at byte {self._pos}")

    # -- structure ---------------------------------------------------------------------
    def _parse(self) -> None:
        if len(self._buf) < 24 or bytes(self._buf[:4]) != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path} is not a GGUF file (bad magic)")
        self._pos = 4
        version = self._unpack("<I", 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors = self._unpack("<Q", 8)
        n_kv = self._unpack("<Q", 8)
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I", 4))
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I", 4)
            ne = struct.unpack_from(f"<{n_dims}Q", self._buf, self._pos)
            self._pos += 8 * n_dims
            ggml_type = self._unpack("<I", 4)
            rel_offset = self._unpack("<Q", 8)
            infos.append((name, tuple(ne), ggml_type, rel_offset))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        for name, ne, type_id, rel_offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name} has unknown GGML type id {type_id}"
                ) from None
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elem = math.prod(ne)
            nbytes = n_elem // block * type_size
            offset = data_start + rel_offset
            if offset + nbytes > len(self._buf):
                raise GGUFFormatError(f"{self.path}: tensor {name} extends past the end of the file")
            self.tensors[name] = TensorInfo(name, qtype, tuple(reversed(ne)), offset, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (uint8, zero-copy view of the memory map)."""
        info = self.tensors[name]
        return self._map[info.offset : info.offset + info.nbytes]

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    return GGUFFile(path).metadata
