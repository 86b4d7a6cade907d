"""A small reader for the header of a GGUF model file: just the key/value metadata the memory
estimate needs (layers, embedding width, heads). Tensor data is never read.

Format (ggml docs/gguf.md, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count, then each key as a u64-length string, a u32 value type and the value.
All little-endian.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import BadInput

# value type → struct format (u8 i8 u16 i16 u32 i32 f32 bool; 10 u64, 11 i64, 12 f64)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 20  # far above any real model; guards against a corrupt count
_MAX_STRING = 16 << 20  # a key or value string (chat templates are tens of KiB); above this the header is corrupt
_MAX_DEPTH = 4  # arrays of arrays: real files nest one level at most
_SMALL_ARRAY = 1024


class _Corrupt(Exception):
    """The header field (a metadata key, or the key's own index) and what is wrong with it."""


@dataclass(frozen=True)
class ModelShape:
    """What the KV-cache estimate needs from a GGUF header."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    context_length: int | None

    def kv_cache_bytes(self, n_ctx: int, bytes_per_element: int = 2) -> int:
        """K and V for every layer and position (llama.cpp's default cache type is f16)."""
        per_token = self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v)
        return per_token * n_ctx * bytes_per_element


class _Reader:
    """Reads the header with every length and count checked against the bytes left in the file before it is
    used: a corrupt header is an error naming its field, never a huge allocation or a long loop."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh, self.size, self.field = fh, size, "magic"

    def _need(self, n: int, what: str) -> None:
        left = self.size - self.fh.tell()
        if n > left:
            raise _Corrupt(f"truncated GGUF header: {self.field}: {what} needs {n} bytes, {left} left in the file")

    def read(self, n: int) -> bytes:
        self._need(n, "the value")
        return self.fh.read(n)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > _MAX_STRING:
            raise _Corrupt(f"corrupt GGUF header: {self.field}: a string of {n} bytes; allowed: at most {_MAX_STRING}")
        self._need(n, f"a string of {n} bytes")
        return self.fh.read(n).decode("utf-8", "replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        """One value; arrays of numbers up to _SMALL_ARRAY items are kept (per-layer head counts), others skipped."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY or depth >= _MAX_DEPTH:
            raise _Corrupt(f"corrupt GGUF header: {self.field}: value type {vtype}; allowed: 0-12, arrays "
                           f"nested at most {_MAX_DEPTH} deep")
        item_type, count = self.unpack("<I"), self.unpack("<Q")
        # the smallest an item can be: a scalar's size, a string's or an array's length fields
        smallest = struct.calcsize(_SCALARS[item_type]) if item_type in _SCALARS else 8 if item_type == _STRING else 12
        self._need(count * smallest, f"an array of {count} items")
        if item_type in _SCALARS:
            if count <= _SMALL_ARRAY:
                return [self.unpack(_SCALARS[item_type]) for _ in range(count)]
            self.fh.seek(smallest * count, 1)
            return None
        for _ in range(count):
            self.value(item_type, depth + 1)
        return None


def read_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file; long arrays (the vocabulary) are skipped as None."""
    try:
        with path.open("rb") as fh:
            r = _Reader(fh, os.fstat(fh.fileno()).st_size)
            try:
                if r.read(4) != b"GGUF":
                    raise BadInput(f"{path}: not a GGUF file (no GGUF magic)")
                r.field = "version"
                version = r.unpack("<I")
                if version not in (2, 3):
                    raise BadInput(f"{path}: GGUF version {version} is not supported; allowed: 2 or 3")
                r.field = "tensor count"
                r.unpack("<Q")
                r.field = "metadata key count"
                count = r.unpack("<Q")
                if count > _MAX_KV:
                    raise BadInput(f"{path}: corrupt GGUF header: {count} metadata keys; allowed: at most {_MAX_KV}")
                meta: dict[str, Any] = {}
                for i in range(count):
                    r.field = f"metadata key #{i}"
                    key = r.string()
                    r.field = key
                    meta[key] = r.value(r.unpack("<I"))
                return meta
            except _Corrupt as exc:
                raise BadInput(f"{path}: {exc}") from None
    except OSError as exc:
        raise BadInput(f"{path}: cannot read the model file ({exc.strerror})") from None


def model_shape(meta: dict[str, Any], source: str) -> ModelShape:
    """The attention shape from GGUF metadata (`<arch>.block_count`, `.embedding_length`, …)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise BadInput(f"{source}: GGUF metadata lacks general.architecture")

    def get(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list) and value:  # per-layer values: the largest bounds the cache
            value = max(value)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BadInput(f"{source}: GGUF metadata {arch}.{key} = {value!r}; need a positive integer")
        return value

    n_embd, n_head = get("embedding_length"), get("attention.head_count")
    head_dim = n_embd // n_head
    ctx = meta.get(f"{arch}.context_length")
    return ModelShape(
        architecture=arch,
        n_layer=get("block_count"),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=get("attention.head_count_kv", n_head),
        head_dim_k=get("attention.key_length", head_dim),
        head_dim_v=get("attention.value_length", head_dim),
        context_length=ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None,
    )
