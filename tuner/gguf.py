"""A small reader for the header of a GGUF model file: just the key/value metadata the memory
estimate needs (layers, embedding width, heads). Tensor data is never read.

Format (ggml docs/gguf.md, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count,
u64 key/value count, then each key as a u64-length string, a u32 value type and the value.
All little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import BadInput

# value type → struct format (u8 i8 u16 i16 u32 i32 f32 bool; 10 u64, 11 i64, 12 f64)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_KV = 1 << 20  # far above any real model; guards against a corrupt count
_SMALL_ARRAY = 1024


class _Truncated(Exception):
    pass


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


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _Truncated
    return data


def _unpack(fh: BinaryIO, fmt: str) -> Any:
    return struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0]


def _string(fh: BinaryIO) -> str:
    return _read(fh, _unpack(fh, "<Q")).decode("utf-8", "replace")


def _value(fh: BinaryIO, vtype: int) -> Any:
    """One value; arrays of numbers up to _SMALL_ARRAY items are kept (per-layer head counts), others skipped."""
    if vtype in _SCALARS:
        return _unpack(fh, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(fh)
    if vtype == _ARRAY:
        item_type, count = _unpack(fh, "<I"), _unpack(fh, "<Q")
        if item_type in _SCALARS:
            if count <= _SMALL_ARRAY:
                return [_unpack(fh, _SCALARS[item_type]) for _ in range(count)]
            fh.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
            return None
        for _ in range(count):
            _value(fh, item_type)
        return None
    raise ValueError(f"unknown value type {vtype}")


def read_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file; long arrays (the vocabulary) are skipped as None."""
    try:
        with path.open("rb") as fh:
            try:
                if _read(fh, 4) != b"GGUF":
                    raise BadInput(f"{path}: not a GGUF file (no GGUF magic)")
                version = _unpack(fh, "<I")
                if version not in (2, 3):
                    raise BadInput(f"{path}: GGUF version {version} is not supported; allowed: 2 or 3")
                _unpack(fh, "<Q")  # tensor count
                count = _unpack(fh, "<Q")
                if count > _MAX_KV:
                    raise BadInput(f"{path}: corrupt GGUF header ({count} metadata keys)")
                meta: dict[str, Any] = {}
                for _ in range(count):
                    key = _string(fh)
                    meta[key] = _value(fh, _unpack(fh, "<I"))
                return meta
            except _Truncated:
                raise BadInput(f"{path}: truncated GGUF header") from None
            except ValueError as exc:
                raise BadInput(f"{path}: corrupt GGUF header ({exc})") from None
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
