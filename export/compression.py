"""Zstandard frames around payloads and artifacts, never trusted to say how big they are."""

from __future__ import annotations

import zstandard

from fedgen.export.tensor_codecs import CodecError

__all__ = ["ZSTD_LEVEL", "compress", "decompress_frame", "is_zstd_frame"]

#: Zstandard level for every ``+zstd`` encoding.
ZSTD_LEVEL = 3
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def compress(payload: bytes) -> bytes:
    """One frame that declares its content size (the receiver checks it before allocating)."""
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(payload)


def is_zstd_frame(data: bytes) -> bool:
    return bytes(data[:4]) == _ZSTD_MAGIC


def decompress_frame(data: bytes, limit: int, label: str = "artifact", exact: bool = False) -> bytes:
    """One Zstandard frame of at most ``limit`` bytes (exactly ``limit`` with ``exact``).

    zstandard allocates a frame's declared content size whatever ``max_output_size`` says, so the
    declaration is checked first; a frame without one is decoded into a buffer capped at ``limit``.
    """
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{label}: data is not a valid zstd frame ({exc})") from None
    if exact and declared not in (-1, limit):
        raise CodecError(f"{label}: zstd frame declares {declared} bytes, expected {limit}")
    if declared > limit:
        raise CodecError(f"{label}: zstd frame declares {declared} bytes, more than the limit of {limit}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(limit, 1), allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{label}: zstd decompression failed (limit {limit} bytes): {exc}") from None
    if exact and len(out) != limit:
        raise CodecError(f"{label}: zstd frame holds {len(out)} bytes, expected {limit}")
    return out
