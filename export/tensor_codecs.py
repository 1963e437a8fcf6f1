"""One class per tensor encoding: how float values become ``Tensor.data`` and come back.

Each codec knows four things: encode (values -> payload bytes and per-channel parameters),
decode (payload -> values, checking every parameter it trusts), its size on the wire, and the
worst-case error of a round trip. A new encoding is one more class here and one more value of
``tensor.proto``'s ``Encoding``; ``codec.py`` (bundles, compression, deltas) does not change.

* ``fp32``: the values themselves, little-endian, in their own dtype. Exact.
* ``fp16``: float tensors rounded to IEEE half precision (round to nearest even). Finite values
  that would overflow float16 (|x| >= 65520) are refused; inf and nan pass through unchanged.
* ``int8``: affine per output channel (dimension 0; a 0-d or 1-d tensor is a single channel):
  ``value = (q - zero_point) * scale``. Each channel's range is widened to include 0, so the zero
  point is an integer in [-128, 127] (exact as a float32) and 0.0 round-trips exactly;
  ``scale = (max - min) / 255`` (1.0 for an all-zero channel). Non-finite values are refused.
* ``topk<p>``: for update deltas. The largest ``p`` percent of the entries by magnitude (at least
  one), as a bitmap of kept positions plus one int8 per kept entry (one affine channel over the
  kept values); everything else decodes as 0. ``codec.ErrorFeedback`` keeps what was dropped.

Integer tensors (int64, int32, uint8) always travel as ``fp32`` does (raw), whatever was asked.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from fedgen.export.encoding import Encoding, EncodingError
from fedgen.v1 import tensor_pb2

__all__ = [
    "FLOAT_DTYPES",
    "NATIVE_DTYPE",
    "WIRE_DTYPE",
    "CodecError",
    "Encoded",
    "Fp16Codec",
    "Int8Codec",
    "RawCodec",
    "TensorCodec",
    "TopKCodec",
    "codec_for",
    "codec_for_wire",
    "dtype_of",
    "enum_name",
    "topk_count",
]

Array = npt.NDArray[Any]
FloatArray = npt.NDArray[np.float32]

_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32


class CodecError(ValueError):
    """A tensor or bundle cannot be encoded or decoded; the message says why."""


# ---------------------------------------------------------------------------- dtypes

#: logical DType -> little-endian numpy wire dtype
WIRE_DTYPE: dict[int, np.dtype[np.generic]] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
}
#: logical DType -> the native numpy dtype a decoded array has
NATIVE_DTYPE: dict[int, np.dtype[np.generic]] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype(np.float32),
    tensor_pb2.DTYPE_FLOAT16: np.dtype(np.float16),
    tensor_pb2.DTYPE_INT64: np.dtype(np.int64),
    tensor_pb2.DTYPE_INT32: np.dtype(np.int32),
    tensor_pb2.DTYPE_UINT8: np.dtype(np.uint8),
}
_DTYPE_OF_KIND: dict[tuple[str, int], int] = {
    ("f", 4): tensor_pb2.DTYPE_FLOAT32,
    ("f", 2): tensor_pb2.DTYPE_FLOAT16,
    ("i", 8): tensor_pb2.DTYPE_INT64,
    ("i", 4): tensor_pb2.DTYPE_INT32,
    ("u", 1): tensor_pb2.DTYPE_UINT8,
}
FLOAT_DTYPES = frozenset({tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16})


def enum_name(enum: Any, value: int) -> str:
    """``ENCODING_FP16 (2)``, or ``unknown value 9`` for a number the enum (a protobuf enum type) lacks."""
    try:
        return f"{enum.Name(value)} ({value})"
    except ValueError:
        return f"unknown value {value}"


def dtype_label(dtype: int) -> str:
    return str(NATIVE_DTYPE[dtype]) if dtype in NATIVE_DTYPE else enum_name(tensor_pb2.DType, dtype)


def dtype_of(array: Array) -> int | None:
    """The logical DType of an array (any byte order), or None when the wire has no such dtype."""
    return _DTYPE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))


def _channels(shape: tuple[int, ...]) -> int:
    """Number of int8 channels: dimension 0 for rank >= 2, else one."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _int8_params(x2d: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per-row (scale, zero_point) as float32 for a finite float array of shape [C, K]."""
    channels = x2d.shape[0]
    if x2d.shape[1] == 0:
        lo = np.zeros(channels, dtype=np.float64)
        hi = np.zeros(channels, dtype=np.float64)
    else:
        lo = np.minimum(x2d.min(axis=1).astype(np.float64), 0.0)
        hi = np.maximum(x2d.max(axis=1).astype(np.float64), 0.0)
    span = hi - lo
    scale = (span / 255.0).astype(np.float32)
    # A scale that underflows the normal float32 range would make x/scale inaccurate
    # (subnormal rounding) or infinite; the smallest normal is plenty.
    scale = np.maximum(scale, np.float32(_F32_TINY))
    scale = np.where(span == 0.0, np.float32(1.0), scale).astype(np.float32)
    zero_point = -128.0 + np.round(-lo / scale.astype(np.float64))
    return scale, np.clip(zero_point, -128.0, 127.0).astype(np.float32)


def _finite_float32(name: str, array: Array, codec: str) -> FloatArray:
    """The array as float32 (float16 widened), refusing non-finite values."""
    x = np.asarray(array, dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        raise CodecError(f"tensor {name!r}: {codec} encoding needs finite values; found inf or nan")
    return x


def _peak(x: FloatArray) -> float:
    finite = x[np.isfinite(x)]
    return float(np.max(np.abs(finite))) if finite.size else 0.0


def topk_count(size: int, density: float) -> int:
    """Entries a top-k tensor of ``size`` elements keeps: ceil(density * size), at least one."""
    return min(size, max(1, math.ceil(density * size))) if size else 0


# ---------------------------------------------------------------------------- codecs


@dataclass(frozen=True)
class Encoded:
    """What a codec made of one tensor: the payload (before compression) and its parameters."""

    payload: bytes
    scales: tuple[float, ...] = ()
    zero_points: tuple[float, ...] = ()


class TensorCodec(ABC):
    """One ``tensor.proto`` Encoding."""

    wire: ClassVar[int]
    #: How an error message describes the payload after the dtype ("float32 as fp16").
    describe_suffix: ClassVar[str] = ""
    #: Whether the payload's length follows from the shape alone (top-k's depends on the values).
    fixed_size: ClassVar[bool] = True

    @abstractmethod
    def encode(self, name: str, array: Array, dtype: int) -> Encoded:
        """Values of a tensor of logical ``dtype`` (float for every codec but raw) -> payload."""

    @abstractmethod
    def payload_bytes(self, count: int, dtype: int) -> int:
        """Exact payload length (``fixed_size``) or its upper bound, for ``count`` elements."""

    @abstractmethod
    def decode(self, t: tensor_pb2.Tensor, label: str, payload: bytes, shape: tuple[int, ...]) -> Array:
        """The checked payload (already decompressed) back to an array of the tensor's native dtype."""

    @abstractmethod
    def error_bound(self, array: Array) -> float:
        """Worst-case ``|decode(encode(x)) - x|`` over the finite values of a float array."""

    def wire_size(self, shape: tuple[int, ...], is_float: bool) -> int:
        """Upper bound of one tensor's bytes before compression, for predicting an unseen upload."""
        overhead = 16 + 2 * len(shape)
        count = math.prod(shape)
        if not is_float:
            return 8 * count + overhead
        return self.payload_bytes(count, tensor_pb2.DTYPE_FLOAT32) + 10 * self._param_count(shape) + overhead

    def _param_count(self, shape: tuple[int, ...]) -> int:
        return 0

    def describe(self, dtype: int) -> str:
        return dtype_label(dtype) + self.describe_suffix

    def check_params(self, t: tensor_pb2.Tensor, label: str, shape: tuple[int, ...]) -> None:
        if len(t.scales) or len(t.zero_points):
            raise CodecError(
                f"{label}: scales/zero_points are only allowed with ENCODING_INT8, "
                f"got {len(t.scales)} scales and {len(t.zero_points)} zero_points"
            )


class RawCodec(TensorCodec):
    wire = tensor_pb2.ENCODING_RAW

    def encode(self, name: str, array: Array, dtype: int) -> Encoded:
        return Encoded(np.ascontiguousarray(array, dtype=WIRE_DTYPE[dtype]).tobytes())

    def payload_bytes(self, count: int, dtype: int) -> int:
        return count * WIRE_DTYPE[dtype].itemsize

    def decode(self, t: tensor_pb2.Tensor, label: str, payload: bytes, shape: tuple[int, ...]) -> Array:
        flat = np.frombuffer(payload, dtype=WIRE_DTYPE[t.dtype])
        return flat.astype(NATIVE_DTYPE[t.dtype], copy=True).reshape(shape)  # copy: frombuffer is read-only

    def error_bound(self, array: Array) -> float:
        return 0.0


class Fp16Codec(TensorCodec):
    wire = tensor_pb2.ENCODING_FP16
    describe_suffix = " as fp16"

    def encode(self, name: str, array: Array, dtype: int) -> Encoded:
        with np.errstate(over="ignore"):  # overflow is detected and reported below
            half = np.ascontiguousarray(array, dtype=np.dtype("<f2"))
        if dtype != tensor_pb2.DTYPE_FLOAT16 and half.size:
            overflow = np.isinf(half) & np.isfinite(array)
            if overflow.any():
                worst = float(np.max(np.abs(np.asarray(array, dtype=np.float32)[overflow])))
                raise CodecError(
                    f"tensor {name!r}: value magnitude {worst:g} overflows float16 "
                    f"(max {_FP16_MAX:g}); use fp32 or int8"
                )
        return Encoded(half.tobytes())

    def payload_bytes(self, count: int, dtype: int) -> int:
        return 2 * count

    def decode(self, t: tensor_pb2.Tensor, label: str, payload: bytes, shape: tuple[int, ...]) -> Array:
        return np.frombuffer(payload, dtype=np.dtype("<f2")).astype(NATIVE_DTYPE[t.dtype], copy=True).reshape(shape)

    def error_bound(self, array: Array) -> float:
        """Half a float16 ulp: ``max|x| * 2**-11 + 2**-24`` (relative for normals, absolute for
        subnormals); 0 for a float16 array. inf/nan pass through unchanged."""
        if dtype_of(array) == tensor_pb2.DTYPE_FLOAT16:
            return 0.0
        return _peak(np.asarray(array, dtype=np.float32)) * 2.0**-11 + 2.0**-24


class Int8Codec(TensorCodec):
    wire = tensor_pb2.ENCODING_INT8
    describe_suffix = " as int8"

    def encode(self, name: str, array: Array, dtype: int) -> Encoded:
        x = _finite_float32(name, array, "int8")
        channels = _channels(x.shape)
        x2d = x.reshape(channels, x.size // channels if channels else 0)
        scales, zero_points = _int8_params(x2d)
        q = np.clip(np.round(x2d / scales[:, None]) + zero_points[:, None], -128, 127).astype(np.int8)
        return Encoded(q.tobytes(), tuple(scales.tolist()), tuple(zero_points.tolist()))

    def payload_bytes(self, count: int, dtype: int) -> int:
        return count

    def _param_count(self, shape: tuple[int, ...]) -> int:
        return _channels(shape)

    def check_params(self, t: tensor_pb2.Tensor, label: str, shape: tuple[int, ...]) -> None:
        channels = _channels(shape)
        if len(t.scales) != channels or len(t.zero_points) != channels:
            raise CodecError(
                f"{label}: int8 needs {channels} scales and zero_points for shape {list(shape)}, "
                f"got {len(t.scales)} scales and {len(t.zero_points)} zero_points"
            )
        scales = np.asarray(t.scales, dtype=np.float32)
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise CodecError(f"{label}: int8 scales must be finite and positive")
        if not np.isfinite(np.asarray(t.zero_points, dtype=np.float32)).all():
            raise CodecError(f"{label}: int8 zero_points must be finite")

    def decode(self, t: tensor_pb2.Tensor, label: str, payload: bytes, shape: tuple[int, ...]) -> Array:
        channels = _channels(shape)
        count = math.prod(shape)
        values = np.frombuffer(payload, dtype=np.int8).reshape(channels, count // channels if channels else 0)
        out = values.astype(np.float32)
        out -= np.asarray(t.zero_points, dtype=np.float32)[:, None]
        out *= np.asarray(t.scales, dtype=np.float32)[:, None]
        native = NATIVE_DTYPE[t.dtype]
        if native == np.float16:
            np.clip(out, -_FP16_MAX, _FP16_MAX, out=out)
        return out.astype(native).reshape(shape)

    def error_bound(self, array: Array) -> float:
        """``max_c(scale_c) / 2`` (half a step of the worst channel) plus float32 slack
        ``max_c(scale_c) * 2**-12 + max|x| * 2**-22``; for a float16 array plus the float16
        rounding of the result, ``(max|x| + max scale) * 2**-11 + 2**-24``. Raises for
        non-finite values, as encoding would."""
        x = _finite_float32("<bound>", array, "int8")
        if x.size == 0:
            return 0.0
        channels = _channels(x.shape)
        scales, _ = _int8_params(x.reshape(channels, x.size // channels))
        smax, peak = float(scales.max()), float(np.max(np.abs(x)))
        bound = smax * (0.5 + 2.0**-12) + peak * 2.0**-22
        if dtype_of(array) == tensor_pb2.DTYPE_FLOAT16:
            bound += (peak + smax) * 2.0**-11 + 2.0**-24
        return bound


class TopKCodec(TensorCodec):
    wire = tensor_pb2.ENCODING_TOPK_INT8
    fixed_size = False

    def __init__(self, density: float = 1.0) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"top-k density must be in (0, 1], got {density}")
        self.density = density

    def encode(self, name: str, array: Array, dtype: int) -> Encoded:
        flat = _finite_float32(name, array, "top-k").reshape(-1)
        k = topk_count(flat.size, self.density)
        keep = np.zeros(flat.size, dtype=bool)
        if k:
            keep[np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]] = True
        kept = flat[keep]
        scale, zero_point = _int8_params(kept.reshape(1, -1))
        q = np.clip(np.round(kept / scale[0]) + zero_point[0], -128, 127).astype(np.int8)
        bitmap = np.packbits(keep, bitorder="little").tobytes()
        return Encoded(bitmap + q.tobytes(), (float(scale[0]),), (float(zero_point[0]),))

    def payload_bytes(self, count: int, dtype: int) -> int:
        """At most every element kept: the bound keeps a hostile frame from inflating further."""
        return (count + 7) // 8 + count

    def wire_size(self, shape: tuple[int, ...], is_float: bool) -> int:
        count = math.prod(shape)
        if not is_float:
            return 8 * count + 16 + 2 * len(shape)
        return (count + 7) // 8 + topk_count(count, self.density) + 10 + 16 + 2 * len(shape)

    def check_params(self, t: tensor_pb2.Tensor, label: str, shape: tuple[int, ...]) -> None:
        if len(t.scales) != 1 or len(t.zero_points) != 1:
            raise CodecError(
                f"{label}: top-k needs 1 scale and 1 zero_point, "
                f"got {len(t.scales)} scales and {len(t.zero_points)} zero_points"
            )
        scale, zero_point = float(t.scales[0]), float(t.zero_points[0])
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(zero_point)):
            raise CodecError(f"{label}: top-k scale must be finite and positive, zero_point finite")

    def decode(self, t: tensor_pb2.Tensor, label: str, payload: bytes, shape: tuple[int, ...]) -> Array:
        """Bitmap + int8 codes back to a dense array; every length is checked before use."""
        count = math.prod(shape)
        bitmap_bytes = (count + 7) // 8
        if len(payload) < bitmap_bytes:
            raise CodecError(f"{label}: top-k data has {len(payload)} bytes, less than its {bitmap_bytes}-byte bitmap")
        bits = np.unpackbits(np.frombuffer(payload[:bitmap_bytes], dtype=np.uint8), bitorder="little")
        if bits[count:].any():
            raise CodecError(f"{label}: top-k bitmap marks positions beyond the tensor's {count} elements")
        keep = bits[:count].astype(bool)
        kept = int(keep.sum())
        if len(payload) != bitmap_bytes + kept:
            raise CodecError(
                f"{label}: top-k data has {len(payload) - bitmap_bytes} value bytes, "
                f"the bitmap marks {kept} kept elements"
            )
        values = np.zeros(count, dtype=np.float32)
        q = np.frombuffer(payload[bitmap_bytes:], dtype=np.int8).astype(np.float32)
        values[keep] = (q - np.float32(t.zero_points[0])) * np.float32(t.scales[0])
        native = NATIVE_DTYPE[t.dtype]
        if native == np.float16:
            np.clip(values, -_FP16_MAX, _FP16_MAX, out=values)
        return values.astype(native).reshape(shape)

    def error_bound(self, array: Array) -> float:
        raise CodecError("top-k has no per-element bound: dropped entries decode as 0 (see ErrorFeedback)")


_RAW, _FP16, _INT8 = RawCodec(), Fp16Codec(), Int8Codec()
_DENSE: dict[str, TensorCodec] = {"fp32": _RAW, "fp16": _FP16, "int8": _INT8}
_BY_WIRE: dict[int, TensorCodec] = {c.wire: c for c in (_RAW, _FP16, _INT8, TopKCodec())}


def codec_for(encoding: Encoding) -> TensorCodec:
    """The tensor codec of an encoding (its ``delta-`` and ``+zstd`` are the bundle's business)."""
    density = encoding.density
    if density is not None:
        return TopKCodec(density)
    codec = _DENSE.get(encoding.codec)
    if codec is None:
        raise EncodingError(f"{encoding.name!r} is not a tensor encoding (tensors: fp32, fp16, int8, topk<percent>)")
    return codec


def codec_for_wire(wire: int) -> TensorCodec | None:
    """The codec that reads a received tensor's Encoding value, or None for a value it does not know."""
    return _BY_WIRE.get(wire)
