"""The one tensor codec: numpy arrays <-> ``fedgen.v1.Tensor`` / ``TensorBundle``.

Everything that puts model weights or updates on the wire goes through here.
It needs only numpy, zstandard and the generated protobuf module (no torch), so
it stays light enough for edge devices, and it never pickles.

Encodings (``EncodingSpec``):

* ``fp32`` / ``raw``: the values themselves, little-endian, in their own dtype.
  Exact.
* ``fp16``: float tensors rounded to IEEE half precision (round to nearest
  even); the ``dtype`` field keeps the logical dtype, so a float32 tensor comes
  back as float32. Finite values that would overflow float16 (|x| >= 65520) are
  refused; inf and nan pass through unchanged.
* ``int8``: affine per output channel (dimension 0; a 0-d or 1-d tensor is a
  single channel): ``value = (q - zero_point) * scale``. Each channel's range is
  widened to include 0, so ``zero_point`` is an integer in [-128, 127] (exact
  as a float32) and 0.0 round-trips exactly; ``scale = (max - min) / 255``
  (1.0 for an all-zero channel). Non-finite values are refused.

* ``topk<p>``: for update deltas. The largest ``p`` percent of the entries by
  magnitude (at least one), sent as a bitmap of kept positions plus one int8
  per kept entry (affine over the kept values, one scale and zero point);
  everything else decodes as 0. ``ErrorFeedback`` keeps what was dropped on
  the sender and adds it to the next delta, so nothing is lost, only delayed.

Integer tensors (int64, int32, uint8) are always sent RAW whatever the spec
asks for; compression still applies to them. ``+zstd`` compresses the encoded
bytes with one Zstandard frame (level ``ZSTD_LEVEL``), kept only when the frame is smaller
than what it holds: a tensor says in its own ``compression`` field whether it is compressed.

Decoding trusts nothing: every enum, the shape, the element count, the exact
byte length and the INT8 parameters are checked, and a Zstandard frame is never
allowed to produce more bytes than the shape implies. Every problem raises
``CodecError`` naming the tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import zstandard
from google.protobuf.message import DecodeError

from fedgen.v1 import tensor_pb2

__all__ = [
    "CodecError",
    "EncodingSpec",
    "ALL_SPECS",
    "ZSTD_LEVEL",
    "DEFAULT_MAX_ELEMENTS",
    "encode_array",
    "decode_array",
    "encode_state",
    "decode_state",
    "bundle_to_bytes",
    "bundle_from_bytes",
    "sha256_hex",
    "max_abs_error_bound",
    "estimate_encoded_bytes",
    "topk_count",
    "apply_delta",
    "state_delta",
    "ErrorFeedback",
    "decompress_frame",
    "is_zstd_frame",
]

#: Zstandard level used for ``+zstd`` specs.
ZSTD_LEVEL = 3
#: Default cap on the number of elements of one decoded tensor.
DEFAULT_MAX_ELEMENTS = 50_000_000

_FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32


class CodecError(ValueError):
    """A tensor or bundle cannot be encoded or decoded; the message says why."""


# ---------------------------------------------------------------------------
# dtypes and enums

# logical DType -> little-endian numpy wire dtype
_WIRE_DTYPE: dict[int, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
}
# logical DType -> native numpy dtype handed back by decode_array
_NATIVE_DTYPE: dict[int, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype(np.float32),
    tensor_pb2.DTYPE_FLOAT16: np.dtype(np.float16),
    tensor_pb2.DTYPE_INT64: np.dtype(np.int64),
    tensor_pb2.DTYPE_INT32: np.dtype(np.int32),
    tensor_pb2.DTYPE_UINT8: np.dtype(np.uint8),
}
# (kind, itemsize) of an input array -> logical DType (any byte order accepted)
_DTYPE_OF_KIND: dict[tuple[str, int], int] = {
    ("f", 4): tensor_pb2.DTYPE_FLOAT32,
    ("f", 2): tensor_pb2.DTYPE_FLOAT16,
    ("i", 8): tensor_pb2.DTYPE_INT64,
    ("i", 4): tensor_pb2.DTYPE_INT32,
    ("u", 1): tensor_pb2.DTYPE_UINT8,
}
_FLOAT_DTYPES = frozenset({tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16})
_ENCODINGS = frozenset({tensor_pb2.ENCODING_RAW, tensor_pb2.ENCODING_FP16, tensor_pb2.ENCODING_INT8,
                        tensor_pb2.ENCODING_TOPK_INT8})
_COMPRESSIONS = frozenset({tensor_pb2.COMPRESSION_NONE, tensor_pb2.COMPRESSION_ZSTD})


def _enum_name(enum, value: int) -> str:
    try:
        return f"{enum.Name(value)} ({value})"
    except ValueError:
        return f"unknown value {value}"


def _dtype_label(dtype: int) -> str:
    return str(_NATIVE_DTYPE[dtype]) if dtype in _NATIVE_DTYPE else _enum_name(tensor_pb2.DType, dtype)


# ---------------------------------------------------------------------------
# EncodingSpec

_ENCODING_NAMES = {
    tensor_pb2.ENCODING_RAW: "fp32",
    tensor_pb2.ENCODING_FP16: "fp16",
    tensor_pb2.ENCODING_INT8: "int8",
    tensor_pb2.ENCODING_TOPK_INT8: "topk",
}
_PARSE_ENCODINGS = {
    "fp32": tensor_pb2.ENCODING_RAW,
    "raw": tensor_pb2.ENCODING_RAW,
    "fp16": tensor_pb2.ENCODING_FP16,
    "int8": tensor_pb2.ENCODING_INT8,
}
_VALID_SPEC_NAMES = ("fp32", "raw", "fp16", "int8", "topk<percent> (e.g. topk10)", "each with an optional +zstd")


@dataclass(frozen=True)
class EncodingSpec:
    """How to put float tensors on the wire: an ``Encoding`` plus a ``Compression``."""

    encoding: int = tensor_pb2.ENCODING_RAW
    compression: int = tensor_pb2.COMPRESSION_NONE
    #: Fraction of entries kept by ``ENCODING_TOPK_INT8`` (0 < density <= 1); 0 otherwise.
    density: float = 0.0

    def __post_init__(self) -> None:
        if self.encoding not in _ENCODINGS:
            raise ValueError(f"unsupported encoding {_enum_name(tensor_pb2.Encoding, self.encoding)}")
        if self.compression not in _COMPRESSIONS:
            raise ValueError(f"unsupported compression {_enum_name(tensor_pb2.Compression, self.compression)}")
        if self.encoding == tensor_pb2.ENCODING_TOPK_INT8:
            if not (0.0 < self.density <= 1.0):
                raise ValueError(f"top-k density must be in (0, 1], got {self.density}")
        elif self.density:
            raise ValueError("density is only meaningful for top-k")

    @property
    def sparse(self) -> bool:
        return self.encoding == tensor_pb2.ENCODING_TOPK_INT8

    @property
    def name(self) -> str:
        """``fp32``, ``fp16``, ``int8`` or ``topk<percent>``, with ``+zstd`` when compressed."""
        base = _ENCODING_NAMES[self.encoding]
        if self.sparse:
            base += f"{self.density * 100:g}"
        return base + "+zstd" if self.compression == tensor_pb2.COMPRESSION_ZSTD else base

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> EncodingSpec:
        """Parse ``fp32``/``raw``, ``fp16``, ``int8`` or ``topk<percent>`` (e.g. ``topk10``),
        each optionally with ``+zstd``."""
        key = str(text).strip().lower()
        base, plus, suffix = key.partition("+")
        if not plus or suffix == "zstd":
            compression = tensor_pb2.COMPRESSION_ZSTD if plus else tensor_pb2.COMPRESSION_NONE
            if base in _PARSE_ENCODINGS:
                return cls(_PARSE_ENCODINGS[base], compression)
            if base.startswith("topk"):
                try:
                    percent = float(base[4:])
                except ValueError:
                    percent = math.nan
                if 0.0 < percent <= 100.0:
                    return cls(tensor_pb2.ENCODING_TOPK_INT8, compression, density=percent / 100.0)
        raise ValueError(f"unknown encoding spec {text!r}; valid: {', '.join(_VALID_SPEC_NAMES)}")


#: The six specs, in a stable order: fp32, fp16, int8, then each with zstd.
ALL_SPECS: tuple[EncodingSpec, ...] = tuple(
    EncodingSpec(enc, comp)
    for comp in (tensor_pb2.COMPRESSION_NONE, tensor_pb2.COMPRESSION_ZSTD)
    for enc in (tensor_pb2.ENCODING_RAW, tensor_pb2.ENCODING_FP16, tensor_pb2.ENCODING_INT8)
)


# ---------------------------------------------------------------------------
# INT8 parameters (shared by the encoder and the error bound)


def _int8_channels(shape: tuple[int, ...]) -> int:
    """Number of INT8 channels: dimension 0 for rank >= 2, else one."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _int8_params(x2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    # A scale that underflows the normal float32 range would make x/scale
    # inaccurate (subnormal rounding) or infinite; the smallest normal is plenty.
    scale = np.maximum(scale, np.float32(_F32_TINY))
    scale = np.where(span == 0.0, np.float32(1.0), scale).astype(np.float32)
    zero_point = -128.0 + np.round(-lo / scale.astype(np.float64))
    zero_point = np.clip(zero_point, -128.0, 127.0).astype(np.float32)
    return scale, zero_point


def _float_view(name: str, array: np.ndarray) -> np.ndarray:
    """The array as float32 (float16 widened), refusing non-finite values."""
    x = np.asarray(array, dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        raise CodecError(f"tensor {name!r}: int8 encoding needs finite values; found inf or nan")
    return x


# ---------------------------------------------------------------------------
# encode


def _compress(payload: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(payload)


def encode_array(name: str, array: np.ndarray, spec: EncodingSpec) -> tensor_pb2.Tensor:
    """Encode one array as a ``Tensor`` under ``spec``.

    Supported dtypes: float32, float16, int64, int32, uint8 (any byte order).
    Integer arrays are always RAW; compression still applies to them.
    """
    if not isinstance(name, str):
        raise CodecError(f"tensor name must be str, got {type(name).__name__}")
    if not isinstance(spec, EncodingSpec):
        raise TypeError(f"spec must be an EncodingSpec, got {type(spec).__name__}")
    array = np.asarray(array)
    dtype = _DTYPE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if dtype is None:
        raise CodecError(
            f"tensor {name!r}: unsupported dtype {array.dtype}; "
            "supported: float32, float16, int64, int32, uint8"
        )
    shape = tuple(int(d) for d in array.shape)
    encoding = spec.encoding if dtype in _FLOAT_DTYPES else tensor_pb2.ENCODING_RAW
    scales: np.ndarray | None = None
    zero_points: np.ndarray | None = None

    if encoding == tensor_pb2.ENCODING_RAW:
        payload = np.ascontiguousarray(array, dtype=_WIRE_DTYPE[dtype]).tobytes()
    elif encoding == tensor_pb2.ENCODING_FP16:
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
        payload = half.tobytes()
    elif encoding == tensor_pb2.ENCODING_TOPK_INT8:
        payload, scales, zero_points = _encode_topk(_float_view(name, array).reshape(-1), spec.density)
    else:  # ENCODING_INT8
        x = _float_view(name, array)
        channels = _int8_channels(shape)
        inner = x.size // channels if channels else 0
        x2d = x.reshape(channels, inner)
        scales, zero_points = _int8_params(x2d)
        q = np.round(x2d / scales[:, None]) + zero_points[:, None]
        q = np.clip(q, -128, 127).astype(np.int8)
        payload = q.tobytes()

    compression = tensor_pb2.COMPRESSION_NONE
    if spec.compression == tensor_pb2.COMPRESSION_ZSTD:
        packed = _compress(payload)
        if len(packed) < len(payload):  # int8 codes and tiny tensors often do not compress
            payload, compression = packed, tensor_pb2.COMPRESSION_ZSTD

    tensor = tensor_pb2.Tensor(
        name=name,
        shape=shape,
        dtype=dtype,
        encoding=encoding,
        compression=compression,
        data=payload,
    )
    if scales is not None:
        tensor.scales.extend(scales.tolist())
        tensor.zero_points.extend(zero_points.tolist())
    return tensor


def topk_count(size: int, density: float) -> int:
    """Entries a top-k tensor of ``size`` elements keeps: ceil(density * size), at least one."""
    return min(size, max(1, math.ceil(density * size))) if size else 0


def _encode_topk(flat: np.ndarray, density: float) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Bitmap of the k largest-magnitude entries, then their int8 codes (one affine channel)."""
    k = topk_count(flat.size, density)
    keep = np.zeros(flat.size, dtype=bool)
    if k:
        keep[np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]] = True
    kept = flat[keep]
    scale, zero_point = _int8_params(kept.reshape(1, -1))
    q = np.clip(np.round(kept / scale[0]) + zero_point[0], -128, 127).astype(np.int8)
    return np.packbits(keep, bitorder="little").tobytes() + q.tobytes(), scale, zero_point


def encode_state(state: Mapping[str, np.ndarray], spec: EncodingSpec, base_sha256: str = "",
                 overrides: Mapping[str, EncodingSpec] | None = None) -> tensor_pb2.TensorBundle:
    """Encode a state dict (name -> array) into a ``TensorBundle``, keeping its order.

    With ``base_sha256`` the arrays are differences against that artifact (see
    ``apply_delta``); top-k only makes sense for such differences. ``overrides`` gives
    some tensors their own spec (e.g. BatchNorm statistics kept exact).
    """
    bundle = tensor_pb2.TensorBundle(base_sha256=base_sha256)
    for key, value in state.items():
        bundle.tensors.append(encode_array(key, value, (overrides or {}).get(key, spec)))
    return bundle


# ---------------------------------------------------------------------------
# decode


def _decompress(label: str, data: bytes, expected: int) -> bytes:
    """Decompress one zstd frame that must hold exactly ``expected`` bytes.

    zstandard allocates the frame's declared content size whatever
    ``max_output_size`` says, so that size is checked first; a frame without
    one is decoded into a buffer capped at ``expected``.
    """
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{label}: data is not a valid zstd frame ({exc})") from None
    if declared != -1 and declared != expected:
        raise CodecError(f"{label}: zstd frame declares {declared} bytes, expected {expected}")
    try:
        out = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=max(expected, 1), allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise CodecError(
            f"{label}: zstd decompression failed (limit {expected} bytes): {exc}"
        ) from None
    if len(out) != expected:
        raise CodecError(f"{label}: zstd frame holds {len(out)} bytes, expected {expected}")
    return out


def decode_array(t: tensor_pb2.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> np.ndarray:
    """Decode and validate one ``Tensor``; returns a writable array of its logical dtype.

    Float32 tensors come back as float32 whatever their encoding, float16 as
    float16, integers in their own dtype.
    """
    label = f"tensor {t.name!r}"
    dtype, encoding, compression = t.dtype, t.encoding, t.compression
    if dtype not in _WIRE_DTYPE:
        raise CodecError(f"{label}: unsupported dtype {_enum_name(tensor_pb2.DType, dtype)}")
    if encoding not in _ENCODINGS:
        raise CodecError(f"{label}: unsupported encoding {_enum_name(tensor_pb2.Encoding, encoding)}")
    if compression not in _COMPRESSIONS:
        raise CodecError(
            f"{label}: unsupported compression {_enum_name(tensor_pb2.Compression, compression)}"
        )
    if encoding != tensor_pb2.ENCODING_RAW and dtype not in _FLOAT_DTYPES:
        raise CodecError(
            f"{label}: encoding {_enum_name(tensor_pb2.Encoding, encoding)} "
            f"is only valid for float dtypes, not {_dtype_label(dtype)}"
        )

    shape = tuple(int(d) for d in t.shape)
    for axis, dim in enumerate(shape):
        if dim < 0:
            raise CodecError(f"{label}: negative dimension {dim} at axis {axis} in shape {list(shape)}")
        if dim > max_elements:
            raise CodecError(
                f"{label}: dimension {dim} at axis {axis} exceeds max_elements {max_elements}"
            )
    count = math.prod(shape)
    if count > max_elements:
        raise CodecError(f"{label}: shape {list(shape)} has {count} elements, more than {max_elements}")

    if encoding == tensor_pb2.ENCODING_TOPK_INT8:
        return _decode_topk(t, label, shape, count, _NATIVE_DTYPE[dtype])
    if encoding == tensor_pb2.ENCODING_RAW:
        wire = _WIRE_DTYPE[dtype]
        what = f"{_dtype_label(dtype)}"
    elif encoding == tensor_pb2.ENCODING_FP16:
        wire = np.dtype("<f2")
        what = f"{_dtype_label(dtype)} as fp16"
    else:
        wire = np.dtype("i1")
        what = f"{_dtype_label(dtype)} as int8"
    expected = count * wire.itemsize

    channels = _int8_channels(shape)
    if encoding == tensor_pb2.ENCODING_INT8:
        if len(t.scales) != channels or len(t.zero_points) != channels:
            raise CodecError(
                f"{label}: int8 needs {channels} scales and zero_points for shape {list(shape)}, "
                f"got {len(t.scales)} scales and {len(t.zero_points)} zero_points"
            )
        scales = np.asarray(t.scales, dtype=np.float32)
        zero_points = np.asarray(t.zero_points, dtype=np.float32)
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise CodecError(f"{label}: int8 scales must be finite and positive")
        if not np.isfinite(zero_points).all():
            raise CodecError(f"{label}: int8 zero_points must be finite")
    elif len(t.scales) or len(t.zero_points):
        raise CodecError(
            f"{label}: scales/zero_points are only allowed with ENCODING_INT8, "
            f"got {len(t.scales)} scales and {len(t.zero_points)} zero_points"
        )

    data = t.data
    if compression == tensor_pb2.COMPRESSION_ZSTD:
        data = _decompress(label, data, expected)
    elif len(data) != expected:
        raise CodecError(
            f"{label}: data has {len(data)} bytes, expected {expected} for shape {list(shape)} {what}"
        )

    native = _NATIVE_DTYPE[dtype]
    flat = np.frombuffer(data, dtype=wire)
    if encoding == tensor_pb2.ENCODING_INT8:
        inner = count // channels if channels else 0
        values = flat.reshape(channels, inner).astype(np.float32)
        values -= zero_points[:, None]
        values *= scales[:, None]
        if native == np.float16:
            np.clip(values, -_FP16_MAX, _FP16_MAX, out=values)
        out = values.astype(native)  # a fresh array either way
    else:
        out = flat.astype(native, copy=True)  # copy: frombuffer views are read-only
    return out.reshape(shape)


def _decode_topk(t: tensor_pb2.Tensor, label: str, shape: tuple[int, ...], count: int,
                 native: np.dtype) -> np.ndarray:
    """Bitmap + int8 codes back to a dense array; every length is checked before use."""
    if len(t.scales) != 1 or len(t.zero_points) != 1:
        raise CodecError(f"{label}: top-k needs 1 scale and 1 zero_point, "
                         f"got {len(t.scales)} scales and {len(t.zero_points)} zero_points")
    scale, zero_point = float(t.scales[0]), float(t.zero_points[0])
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(zero_point)):
        raise CodecError(f"{label}: top-k scale must be finite and positive, zero_point finite")
    bitmap_bytes = (count + 7) // 8
    data = t.data
    if t.compression == tensor_pb2.COMPRESSION_ZSTD:
        # At most every element kept: the bound keeps a hostile frame from inflating further.
        data = decompress_frame(data, bitmap_bytes + count, label=label)
    if len(data) < bitmap_bytes:
        raise CodecError(f"{label}: top-k data has {len(data)} bytes, less than its {bitmap_bytes}-byte bitmap")
    bits = np.unpackbits(np.frombuffer(data[:bitmap_bytes], dtype=np.uint8), bitorder="little")
    if bits[count:].any():
        raise CodecError(f"{label}: top-k bitmap marks positions beyond the tensor's {count} elements")
    keep = bits[:count]
    kept = int(keep.sum())
    if len(data) != bitmap_bytes + kept:
        raise CodecError(f"{label}: top-k data has {len(data) - bitmap_bytes} value bytes, "
                         f"the bitmap marks {kept} kept elements")
    values = np.zeros(count, dtype=np.float32)
    q = np.frombuffer(data[bitmap_bytes:], dtype=np.int8).astype(np.float32)
    values[keep.astype(bool)] = (q - np.float32(zero_point)) * np.float32(scale)
    if native == np.float16:
        np.clip(values, -_FP16_MAX, _FP16_MAX, out=values)
    return values.astype(native).reshape(shape)


def decode_state(
    bundle: tensor_pb2.TensorBundle, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> dict[str, np.ndarray]:
    """Decode every tensor of a bundle into an ordered dict; duplicate names are an error."""
    state: dict[str, np.ndarray] = {}
    for tensor in bundle.tensors:
        if tensor.name in state:
            raise CodecError(f"tensor {tensor.name!r}: duplicate name in bundle")
        state[tensor.name] = decode_array(tensor, max_elements=max_elements)
    return state


# ---------------------------------------------------------------------------
# bytes


def bundle_to_bytes(bundle: tensor_pb2.TensorBundle) -> bytes:
    """Deterministic wire bytes of a bundle (same bundle, same bytes, same hash)."""
    return bundle.SerializeToString(deterministic=True)


def bundle_from_bytes(data: bytes) -> tensor_pb2.TensorBundle:
    """Parse a bundle; malformed protobuf raises ``CodecError``."""
    bundle = tensor_pb2.TensorBundle()
    try:
        bundle.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise CodecError(f"malformed TensorBundle: {exc}") from None
    return bundle


def apply_delta(base: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``base + delta`` tensor by tensor, in the base's dtypes; the keys and shapes must match."""
    if list(base) != list(delta):
        missing = sorted(set(base) - set(delta))
        extra = sorted(set(delta) - set(base))
        raise CodecError(f"delta does not match its base: missing {missing[:5]}, unexpected {extra[:5]}")
    out: dict[str, np.ndarray] = {}
    for key, b in base.items():
        d = delta[key]
        if d.shape != b.shape:
            raise CodecError(f"tensor {key!r}: delta shape {list(d.shape)} != base shape {list(b.shape)}")
        out[key] = (b + d.astype(b.dtype)).astype(b.dtype) if b.dtype.kind == "f" else b + d.astype(b.dtype)
    return out


def state_delta(state: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``state - base`` tensor by tensor (integers exactly); the inverse of ``apply_delta``."""
    return {k: (np.asarray(v) - np.asarray(base[k]).astype(np.asarray(v).dtype)) for k, v in state.items()}


class ErrorFeedback:
    """The sender's memory of what lossy update encodings dropped (error feedback).

    ``encode(delta)`` adds the residual left by earlier rounds, encodes, and keeps the new
    difference between what it meant to send and what the receiver will decode. Over rounds
    the receiver gets the sum of all deltas, late rather than never.
    """

    def __init__(self) -> None:
        self.residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray], spec: EncodingSpec, base_sha256: str,
               exact: Collection[str] = ()) -> tensor_pb2.TensorBundle:
        """``exact`` names tensors sent as fp32 differences with no memory: statistics such as
        BatchNorm's running mean and variance, which are states rather than accumulating
        updates (a held-back difference sent again later would overshoot them)."""
        target = {}
        for key, value in delta.items():
            value = np.asarray(value)
            previous = self.residual.get(key)
            if value.dtype.kind == "f" and previous is not None and previous.shape == value.shape:
                value = value + previous
            target[key] = value
        bundle = encode_state(target, spec, base_sha256, overrides={k: EncodingSpec() for k in exact})
        sent = decode_state(bundle)
        self.residual = {k: (v - sent[k]).astype(np.float32) for k, v in target.items()
                         if v.dtype.kind == "f" and k not in exact}
        return bundle


def estimate_encoded_bytes(shapes: Mapping[str, tuple[tuple[int, ...], bool]], spec: EncodingSpec) -> int:
    """Upper bound of a bundle's payload bytes before compression, from (shape, is_float) per tensor.

    Used by the link policy to predict an upload it has not seen yet.
    """
    total = 0
    for name, (shape, is_float) in shapes.items():
        n = math.prod(shape)
        overhead = len(name) + 16 + 2 * len(shape)
        if not is_float:
            total += 8 * n + overhead
        elif spec.encoding == tensor_pb2.ENCODING_RAW:
            total += 4 * n + overhead
        elif spec.encoding == tensor_pb2.ENCODING_FP16:
            total += 2 * n + overhead
        elif spec.encoding == tensor_pb2.ENCODING_INT8:
            total += n + 10 * _int8_channels(shape) + overhead
        else:
            total += (n + 7) // 8 + topk_count(n, spec.density) + 10 + overhead
    return total


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def is_zstd_frame(data: bytes) -> bool:
    return bytes(data[:4]) == _ZSTD_MAGIC


def decompress_frame(data: bytes, limit: int, label: str = "artifact") -> bytes:
    """One Zstandard frame, refusing to produce more than ``limit`` bytes: compressed artifacts
    are never trusted to say how big they are."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{label}: data is not a valid zstd frame ({exc})") from None
    if declared > limit:
        raise CodecError(f"{label}: zstd frame declares {declared} bytes, more than the limit of {limit}")
    try:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=max(limit, 1), allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"{label}: zstd decompression failed (limit {limit} bytes): {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# error bounds


def max_abs_error_bound(array: np.ndarray, spec: EncodingSpec) -> float:
    """Documented worst-case ``|decode(encode(x)) - x|`` over the finite values of ``array``.

    * RAW, integer dtypes, and fp16 of a float16 array: 0 (exact).
    * fp16 of float32: ``max|x| * 2**-11 + 2**-24`` (half a float16 ulp, relative
      for normals, absolute for subnormals). inf/nan pass through unchanged.
    * int8: ``max_c(scale_c) / 2`` (half a quantisation step of the worst
      channel), plus a small slack for float32 arithmetic:
      ``max_c(scale_c) * 2**-12 + max|x| * 2**-22``; for a float16 array, plus
      the float16 rounding of the result, ``(max|x| + max scale) * 2**-11 + 2**-24``.
      Raises ``CodecError`` for non-finite values, as encoding would.
    """
    array = np.asarray(array)
    dtype = _DTYPE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if dtype is None:
        raise CodecError(f"unsupported dtype {array.dtype}")
    if dtype not in _FLOAT_DTYPES or spec.encoding == tensor_pb2.ENCODING_RAW or array.size == 0:
        return 0.0
    if spec.sparse:
        raise CodecError("top-k has no per-element bound: dropped entries decode as 0 (see ErrorFeedback)")
    if spec.encoding == tensor_pb2.ENCODING_FP16:
        if dtype == tensor_pb2.DTYPE_FLOAT16:
            return 0.0
        x = np.asarray(array, dtype=np.float32)
        finite = x[np.isfinite(x)]
        peak = float(np.max(np.abs(finite))) if finite.size else 0.0
        return peak * 2.0**-11 + 2.0**-24
    # INT8
    x = _float_view("<bound>", array)
    channels = _int8_channels(array.shape)
    x2d = x.reshape(channels, x.size // channels)
    scales, _ = _int8_params(x2d)
    smax = float(scales.max())
    peak = float(np.max(np.abs(x)))
    bound = smax * (0.5 + 2.0**-12) + peak * 2.0**-22
    if dtype == tensor_pb2.DTYPE_FLOAT16:
        bound += (peak + smax) * 2.0**-11 + 2.0**-24
    return bound
