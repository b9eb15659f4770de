"""Broken GGUF files made from a valid tiny one (tandem.formats.tiny): each damage is one way a
download, a disk or a hostile user breaks a model file, with a fragment of the one-line error that
must name it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

from tandem.formats.tiny import TinySpec, write_tiny_gguf

Damage = Callable[[bytes], bytes]


def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + struct.calcsize(fmt) :]


def tensor_entry(data: bytes, name: str) -> tuple[int, int]:
    """(offset of n_dims, n_dims) of a tensor's entry in the tensor table."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.rindex(key) + len(key)  # the table follows the metadata: the last occurrence is the entry
    return at, struct.unpack_from("<I", data, at)[0]


def _set_dims(name: str, dims: tuple[int, ...]) -> Damage:
    def damage(data: bytes) -> bytes:
        at, n_dims = tensor_entry(data, name)
        assert n_dims == len(dims)
        for i, d in enumerate(dims):
            data = _put(data, at + 4 + 8 * i, "<Q", d)
        return data

    return damage


def _set_field(name: str, field: str, value: int) -> Damage:
    def damage(data: bytes) -> bytes:
        at, n_dims = tensor_entry(data, name)
        after_dims = at + 4 + 8 * n_dims
        if field == "n_dims":
            return _put(data, at, "<I", value)
        if field == "type":
            return _put(data, after_dims, "<I", value)
        return _put(data, after_dims + 4, "<Q", value)  # the offset

    return damage


LAST = "blk.1.ffn_down.weight"  # the last tensor of TinySpec(layers=2)

# name -> (damage, fragment of the error message); pull must refuse every one of these.
BROKEN: dict[str, tuple[Damage, str]] = {
    "truncated": (lambda d: d[: len(d) - 1000], "the file is truncated"),
    "truncated_header": (lambda d: d[:300], "truncated or corrupt header"),
    "truncated_metadata": (lambda d: d[:4000], "truncated or corrupt header"),
    "bad_magic": (lambda d: b"GGUX" + d[4:], "not a GGUF file"),
    "bad_version": (lambda d: _put(d, 4, "<I", 99), "unsupported GGUF version 99"),
    "huge_tensor_count": (lambda d: _put(d, 8, "<Q", 2**60), "claims 1152921504606846976 tensors"),
    "huge_kv_count": (lambda d: _put(d, 16, "<Q", 2**60), "claims 1152921504606846976 metadata entries"),
    "huge_string_length": (lambda d: _put(d, 24, "<Q", 2**40), "claims 1099511627776 bytes"),
    "tensor_dims": (_set_dims("token_embd.weight", (64, 542)), "a tensor's dimensions, type or offset"),
    "tensor_offset_past_end": (_set_field(LAST, "offset", 2**40), f"tensor {LAST} (bytes"),
    "unknown_tensor_type": (_set_field(LAST, "type", 999), "unknown GGML type id 999"),
    "too_many_dims": (_set_field(LAST, "n_dims", 9), "has 9 dimensions"),
}


def _set_u32_metadata(key: str, value: int) -> Damage:
    def damage(data: bytes) -> bytes:
        entry = struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", 4)  # 4: GGUF's UINT32
        return _put(data, data.index(entry) + len(entry), "<I", value)

    return damage


# Sound structure, wrong model: ffn_up's two dimensions swapped (same byte count). Only the load-time
# check against the config finds it.
SWAPPED = "blk.0.ffn_up.weight"
swap_ffn_up: Damage = _set_dims(SWAPPED, (128, 64))
# A layer count of billions: must fail at the first missing layer, not try to list them all.
huge_block_count: Damage = _set_u32_metadata("llama.block_count", 2**31)


def tiny_bytes(folder: Path) -> bytes:
    return write_tiny_gguf(folder / "valid.gguf", TinySpec(context=256)).read_bytes()


def write_broken(folder: Path, name: str, valid: bytes) -> Path:
    damage = {"swapped": swap_ffn_up, "huge_block_count": huge_block_count}.get(name) or BROKEN[name][0]
    path = folder / f"{name}.gguf"
    path.write_bytes(damage(valid))
    return path
