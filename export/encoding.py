"""Encodings as values: the one parser for names such as ``delta-int8+zstd``.

A name says how a tensor bundle or an artifact travels: an optional ``delta-`` (a difference
against a model the receiver already holds), a codec, and an optional ``+zstd`` (one Zstandard
frame around what the codec made). Codecs: ``fp32`` (alias ``raw``), ``fp16``, ``int8`` and
``topk<percent>`` for tensors (see ``tensor_codecs``); ``int4`` only for ONNX weights. The config,
the link policy, the wire and the codecs all hold an ``Encoding``; only ``Encoding.parse`` reads
text, and ``Encoding.name`` is the one way to write it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["DELTA_PREFIX", "ONNX_WEIGHT_CODECS", "ZSTD_SUFFIX", "Encoding", "EncodingError"]

DELTA_PREFIX = "delta-"
ZSTD_SUFFIX = "+zstd"
#: How the weights of an ONNX artifact (FedGen's generator) may travel, most faithful first.
ONNX_WEIGHT_CODECS = ("fp32", "fp16", "int8", "int4")
_PLAIN_CODECS = ("fp32", "fp16", "int8", "int4")
_ALIASES = {"raw": "fp32"}
_TOPK = "topk"
_VALID = (
    "fp32, raw, fp16, int8, topk<percent> (e.g. topk10), int4 (ONNX weights only), each with an "
    "optional +zstd; delta- before a model encoding"
)


class EncodingError(ValueError):
    """An encoding name that does not parse, or an encoding used where it does not apply."""


@dataclass(frozen=True)
class Encoding:
    """``[delta-]<codec>[+zstd]`` as a value: equal names are equal encodings."""

    codec: str = "fp32"
    zstd: bool = False
    delta: bool = False

    def __post_init__(self) -> None:
        if self.codec not in _PLAIN_CODECS and _topk_percent(self.codec) is None:
            raise EncodingError(f"unknown codec {self.codec!r}; valid: {_VALID}")

    @classmethod
    def parse(cls, text: str) -> Encoding:
        """Reads a name (case and surrounding blanks do not matter); ``EncodingError`` names the valid forms."""
        key = str(text).strip().lower()
        delta = key.startswith(DELTA_PREFIX)
        key = key.removeprefix(DELTA_PREFIX)
        codec, plus, suffix = key.partition("+")
        codec = _ALIASES.get(codec, codec)
        if plus and suffix != "zstd":
            raise EncodingError(f"unknown encoding {text!r}; valid: {_VALID}")
        percent = _topk_percent(codec)
        if percent is not None:
            codec = f"{_TOPK}{percent:g}"  # one spelling per value: topk10.0 is topk10
        elif codec not in _PLAIN_CODECS:
            raise EncodingError(f"unknown encoding {text!r}; valid: {_VALID}")
        return cls(codec, zstd=bool(plus), delta=delta)

    @property
    def name(self) -> str:
        return (DELTA_PREFIX if self.delta else "") + self.codec + (ZSTD_SUFFIX if self.zstd else "")

    def __str__(self) -> str:
        return self.name

    @property
    def density(self) -> float | None:
        """Share of entries a top-k encoding keeps (0 < density <= 1); None for dense codecs."""
        percent = _topk_percent(self.codec)
        return None if percent is None else percent / 100.0

    @property
    def sparse(self) -> bool:
        return self.density is not None

    def plain(self) -> Encoding:
        """The same encoding of the whole values rather than of a difference."""
        return replace(self, delta=False)


def _topk_percent(codec: str) -> float | None:
    if not codec.startswith(_TOPK):
        return None
    try:
        percent = float(codec[len(_TOPK) :])
    except ValueError:
        return None
    return percent if math.isfinite(percent) and 0.0 < percent <= 100.0 else None
