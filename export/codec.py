"""The one tensor codec: numpy arrays <-> ``fedgen.v1.Tensor`` / ``TensorBundle``.

Everything that puts model weights or updates on the wire goes through here. It needs only
numpy, zstandard and the generated protobuf module (no torch), so it stays light enough for edge
devices, and it never pickles. How values become bytes is each encoding's own class
(``tensor_codecs``); this module adds what every encoding shares: dtypes and shapes checked on
the way in and out, ``+zstd`` kept per tensor only where it makes the tensor smaller (a tensor
says in its own ``compression`` field whether it is compressed), differences against a base
model, and error feedback for lossy updates.

Decoding trusts nothing: every enum, the shape, the element count, the exact byte length and
every codec parameter are checked, and a Zstandard frame is never allowed to produce more bytes
than the shape implies. Every problem raises ``CodecError`` naming the tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError

from fedgen.export.compression import compress, decompress_frame
from fedgen.export.encoding import Encoding, EncodingError
from fedgen.export.tensor_codecs import (
    FLOAT_DTYPES,
    WIRE_DTYPE,
    CodecError,
    RawCodec,
    codec_for,
    codec_for_wire,
    dtype_label,
    dtype_of,
    enum_name,
)
from fedgen.v1 import tensor_pb2

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "DENSE_ENCODINGS",
    "CodecError",
    "Encoding",
    "EncodingError",
    "ErrorFeedback",
    "State",
    "apply_delta",
    "bundle_from_bytes",
    "bundle_to_bytes",
    "decode_array",
    "decode_state",
    "encode_array",
    "encode_state",
    "estimate_encoded_bytes",
    "max_abs_error_bound",
    "sha256_hex",
    "state_delta",
]

#: A model's (or an update's) tensors by state-dict key, in order.
State = dict[str, npt.NDArray[Any]]
#: Default cap on the number of elements of one decoded tensor.
DEFAULT_MAX_ELEMENTS = 50_000_000
#: The six dense encodings, in a stable order: fp32, fp16, int8, then each with zstd.
DENSE_ENCODINGS: tuple[Encoding, ...] = tuple(
    Encoding(codec, zstd) for zstd in (False, True) for codec in ("fp32", "fp16", "int8")
)
_RAW = RawCodec()
_COMPRESSIONS = frozenset({tensor_pb2.COMPRESSION_NONE, tensor_pb2.COMPRESSION_ZSTD})


def encode_array(name: str, array: npt.ArrayLike, encoding: Encoding) -> tensor_pb2.Tensor:
    """Encode one array as a ``Tensor``.

    Supported dtypes: float32, float16, int64, int32, uint8 (any byte order). Integer arrays are
    always raw; compression still applies to them.
    """
    if not isinstance(name, str):
        raise CodecError(f"tensor name must be str, got {type(name).__name__}")
    if not isinstance(encoding, Encoding):
        raise TypeError(f"encoding must be an Encoding, got {type(encoding).__name__}")
    values = np.asarray(array)
    dtype = dtype_of(values)
    if dtype is None:
        raise CodecError(
            f"tensor {name!r}: unsupported dtype {values.dtype}; supported: float32, float16, int64, int32, uint8"
        )
    codec = codec_for(encoding) if dtype in FLOAT_DTYPES else _RAW
    encoded = codec.encode(name, values, dtype)
    payload, compression = encoded.payload, tensor_pb2.COMPRESSION_NONE
    if encoding.zstd:
        packed = compress(payload)
        if len(packed) < len(payload):  # int8 codes and tiny tensors often do not compress
            payload, compression = packed, tensor_pb2.COMPRESSION_ZSTD
    return tensor_pb2.Tensor(
        name=name,
        shape=[int(d) for d in values.shape],
        dtype=tensor_pb2.DType.ValueType(dtype),
        encoding=tensor_pb2.Encoding.ValueType(codec.wire),
        compression=compression,
        data=payload,
        scales=encoded.scales,
        zero_points=encoded.zero_points,
    )


def encode_state(
    state: Mapping[str, npt.ArrayLike],
    encoding: Encoding,
    base_sha256: str = "",
    overrides: Mapping[str, Encoding] | None = None,
) -> tensor_pb2.TensorBundle:
    """Encode a state dict (name -> array) into a ``TensorBundle``, keeping its order.

    With ``base_sha256`` the arrays are differences against that artifact (see ``apply_delta``);
    top-k only makes sense for such differences. ``overrides`` gives some tensors their own
    encoding (e.g. BatchNorm statistics kept exact).
    """
    bundle = tensor_pb2.TensorBundle(base_sha256=base_sha256)
    for key, value in state.items():
        bundle.tensors.append(encode_array(key, value, (overrides or {}).get(key, encoding)))
    return bundle


def decode_array(t: tensor_pb2.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> npt.NDArray[Any]:
    """Decode and validate one ``Tensor``; returns a writable array of its logical dtype.

    Float32 tensors come back as float32 whatever their encoding, float16 as float16, integers
    in their own dtype.
    """
    label = f"tensor {t.name!r}"
    if t.dtype not in WIRE_DTYPE:
        raise CodecError(f"{label}: unsupported dtype {enum_name(tensor_pb2.DType, t.dtype)}")
    codec = codec_for_wire(t.encoding)
    if codec is None:
        raise CodecError(f"{label}: unsupported encoding {enum_name(tensor_pb2.Encoding, t.encoding)}")
    if t.compression not in _COMPRESSIONS:
        raise CodecError(f"{label}: unsupported compression {enum_name(tensor_pb2.Compression, t.compression)}")
    if codec.wire != tensor_pb2.ENCODING_RAW and t.dtype not in FLOAT_DTYPES:
        raise CodecError(
            f"{label}: encoding {enum_name(tensor_pb2.Encoding, t.encoding)} "
            f"is only valid for float dtypes, not {dtype_label(t.dtype)}"
        )
    shape = tuple(int(d) for d in t.shape)
    for axis, dim in enumerate(shape):
        if dim < 0:
            raise CodecError(f"{label}: negative dimension {dim} at axis {axis} in shape {list(shape)}")
        if dim > max_elements:
            raise CodecError(f"{label}: dimension {dim} at axis {axis} exceeds max_elements {max_elements}")
    count = math.prod(shape)
    if count > max_elements:
        raise CodecError(f"{label}: shape {list(shape)} has {count} elements, more than {max_elements}")
    codec.check_params(t, label, shape)
    size = codec.payload_bytes(count, t.dtype)
    payload = t.data
    if t.compression == tensor_pb2.COMPRESSION_ZSTD:
        payload = decompress_frame(payload, size, label=label, exact=codec.fixed_size)
    elif codec.fixed_size and len(payload) != size:
        raise CodecError(
            f"{label}: data has {len(payload)} bytes, expected {size} for shape {list(shape)} {codec.describe(t.dtype)}"
        )
    return codec.decode(t, label, payload, shape)


def decode_state(bundle: tensor_pb2.TensorBundle, max_elements: int = DEFAULT_MAX_ELEMENTS) -> State:
    """Decode every tensor of a bundle into an ordered dict; duplicate names are an error."""
    state: State = {}
    for tensor in bundle.tensors:
        if tensor.name in state:
            raise CodecError(f"tensor {tensor.name!r}: duplicate name in bundle")
        state[tensor.name] = decode_array(tensor, max_elements=max_elements)
    return state


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


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------ differences


def apply_delta(base: Mapping[str, npt.NDArray[Any]], delta: Mapping[str, npt.NDArray[Any]]) -> State:
    """``base + delta`` tensor by tensor, in the base's dtypes; the keys and shapes must match."""
    if list(base) != list(delta):
        missing = sorted(set(base) - set(delta))
        extra = sorted(set(delta) - set(base))
        raise CodecError(f"delta does not match its base: missing {missing[:5]}, unexpected {extra[:5]}")
    out: State = {}
    for key, b in base.items():
        d = delta[key]
        if d.shape != b.shape:
            raise CodecError(f"tensor {key!r}: delta shape {list(d.shape)} != base shape {list(b.shape)}")
        out[key] = np.asarray(b + d.astype(b.dtype)).astype(b.dtype)
    return out


def state_delta(state: Mapping[str, npt.NDArray[Any]], base: Mapping[str, npt.NDArray[Any]]) -> State:
    """``state - base`` tensor by tensor (integers exactly); the inverse of ``apply_delta``."""
    return {k: np.asarray(np.asarray(v) - np.asarray(base[k]).astype(np.asarray(v).dtype)) for k, v in state.items()}


class ErrorFeedback:
    """The sender's memory of what lossy update encodings dropped (error feedback).

    ``encode(delta)`` adds the residual left by earlier rounds, encodes, and keeps the new
    difference between what it meant to send and what the receiver will decode. Over rounds the
    receiver gets the sum of all deltas, late rather than never.
    """

    def __init__(self) -> None:
        self.residual: State = {}

    def encode(
        self,
        delta: Mapping[str, npt.NDArray[Any]],
        encoding: Encoding,
        base_sha256: str,
        exact: Collection[str] = (),
    ) -> tensor_pb2.TensorBundle:
        """``exact`` names tensors sent as fp32 differences with no memory: statistics such as
        BatchNorm's running mean and variance, which are states rather than accumulating updates
        (a held-back difference sent again later would overshoot them)."""
        target: State = {}
        for key, value in delta.items():
            value = np.asarray(value)
            previous = self.residual.get(key)
            if value.dtype.kind == "f" and previous is not None and previous.shape == value.shape:
                value = value + previous
            target[key] = value
        bundle = encode_state(target, encoding, base_sha256, overrides=dict.fromkeys(exact, Encoding()))
        sent = decode_state(bundle)
        self.residual = {
            k: (v - sent[k]).astype(np.float32) for k, v in target.items() if v.dtype.kind == "f" and k not in exact
        }
        return bundle


# ----------------------------------------------------------------------- sizes, bounds


def estimate_encoded_bytes(shapes: Mapping[str, tuple[tuple[int, ...], bool]], encoding: Encoding) -> int:
    """Upper bound of a bundle's payload bytes before compression, from (shape, is_float) per tensor.

    Used by the link policy to predict an upload it has not seen yet.
    """
    codec = codec_for(encoding)
    return sum(len(name) + codec.wire_size(shape, is_float) for name, (shape, is_float) in shapes.items())


def max_abs_error_bound(array: npt.ArrayLike, encoding: Encoding) -> float:
    """Documented worst-case ``|decode(encode(x)) - x|`` over the finite values of ``array``
    (each codec documents its own; 0 for raw and for integer tensors)."""
    values = np.asarray(array)
    dtype = dtype_of(values)
    if dtype is None:
        raise CodecError(f"unsupported dtype {values.dtype}")
    if dtype not in FLOAT_DTYPES or values.size == 0:
        return 0.0
    return codec_for(encoding).error_bound(values)
