"""Tests for fedgen.export.codec: round trips, error bounds, sizes and hostile input."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedgen.export.codec import (
    DENSE_ENCODINGS,
    CodecError,
    Encoding,
    bundle_from_bytes,
    bundle_to_bytes,
    decode_array,
    decode_state,
    encode_array,
    encode_state,
    max_abs_error_bound,
    sha256_hex,
)
from fedgen.export.compression import ZSTD_LEVEL
from fedgen.v1 import tensor_pb2

SPECS = [
    "fp32",
    "fp16",
    "int8",
    "fp32+zstd",
    "fp16+zstd",
    "int8+zstd",
]
SHAPES = [(), (1,), (7,), (32,), (32, 784), (8, 3, 5, 5), (0,), (0, 4), (3, 0), (2, 1, 1, 1)]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _roundtrip(array: np.ndarray, spec: Encoding, name: str = "t") -> np.ndarray:
    bundle = encode_state({name: array}, spec)
    data = bundle_to_bytes(bundle)
    return decode_state(bundle_from_bytes(data))[name]


# ---------------------------------------------------------------------------
# Encoding


def test_spec_parse_and_names():
    assert Encoding.parse("fp32") == Encoding()
    assert Encoding.parse("raw") == Encoding()
    assert Encoding.parse(" FP16+ZSTD ") == Encoding("fp16", zstd=True)
    assert Encoding.parse("delta-int8+zstd") == Encoding("int8", zstd=True, delta=True)
    assert Encoding.parse("delta-int8+zstd").plain() == Encoding.parse("int8+zstd")
    for text in SPECS:
        assert Encoding.parse(text).name == text
    assert Encoding.parse("raw+zstd").name == "fp32+zstd"
    assert [s.name for s in DENSE_ENCODINGS] == SPECS


@pytest.mark.parametrize("bad", ["", "fp64", "fp16+gzip", "fp16+", "+zstd", "int8+zstd+zstd", "delta-"])
def test_spec_parse_rejects_unknown(bad):
    with pytest.raises(ValueError, match="valid: fp32, raw, fp16, int8"):
        Encoding.parse(bad)


def test_spec_rejects_unknown_codecs():
    with pytest.raises(ValueError, match="unknown codec 'fp64'"):
        Encoding("fp64")
    with pytest.raises(ValueError, match="unknown codec 'topk0'"):
        Encoding("topk0")


def test_int4_is_an_encoding_but_not_a_tensor_encoding():
    """4-bit weights exist for ONNX artifacts (the generator); no tensor travels in them."""
    assert Encoding.parse("int4+zstd").name == "int4+zstd"
    with pytest.raises(ValueError, match="'int4' is not a tensor encoding"):
        encode_array("w", np.ones(4, np.float32), Encoding.parse("int4"))


# ---------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_roundtrip_within_bound(spec_name, shape):
    spec = Encoding.parse(spec_name)
    x = (_rng(len(shape)).standard_normal(shape) * 3.0).astype(np.float32)
    y = _roundtrip(x, spec)
    assert y.dtype == np.float32
    assert y.shape == x.shape
    assert y.flags.writeable
    bound = max_abs_error_bound(x, spec)
    if spec.codec == "fp32":
        assert bound == 0.0
        np.testing.assert_array_equal(y, x)
    else:
        err = float(np.max(np.abs(y.astype(np.float64) - x))) if x.size else 0.0
        assert err <= bound, (err, bound)
    y[...] = 0  # writable, owns its memory


@pytest.mark.parametrize("spec_name", SPECS)
def test_float16_input_keeps_logical_dtype(spec_name):
    spec = Encoding.parse(spec_name)
    x = _rng(1).standard_normal((4, 6)).astype(np.float16)
    t = encode_array("h", x, spec)
    assert t.dtype == tensor_pb2.DTYPE_FLOAT16
    y = decode_array(t)
    assert y.dtype == np.float16
    err = float(np.max(np.abs(y.astype(np.float64) - x.astype(np.float64))))
    assert err <= max_abs_error_bound(x, spec)
    if spec.codec != "int8":
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_integer_buffers_exact_and_raw_under_every_spec(spec_name, dtype):
    spec = Encoding.parse(spec_name)
    info = np.iinfo(dtype)
    x = _rng(2).integers(info.min, info.max, size=(5, 3), dtype=dtype, endpoint=True)
    x.flat[0], x.flat[1] = info.min, info.max
    t = encode_array("buf", x, spec)
    assert t.encoding == tensor_pb2.ENCODING_RAW
    # Random integers do not compress: +zstd is dropped for this tensor rather than making it bigger.
    assert t.compression == tensor_pb2.COMPRESSION_NONE
    assert not t.scales and not t.zero_points
    y = decode_array(t)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, x)
    assert max_abs_error_bound(x, spec) == 0.0


def test_int64_scalar_num_batches_tracked():
    x = np.array(12345678901234, dtype=np.int64)
    for spec in DENSE_ENCODINGS:
        y = _roundtrip(x, spec)
        assert y.shape == () and y.dtype == np.int64 and int(y) == 12345678901234


def test_fp16_metadata_and_size():
    x = _rng(3).standard_normal((32, 784)).astype(np.float32)
    raw = encode_array("fc1.weight", x, Encoding.parse("fp32"))
    half = encode_array("fc1.weight", x, Encoding.parse("fp16"))
    assert half.dtype == tensor_pb2.DTYPE_FLOAT32
    assert half.encoding == tensor_pb2.ENCODING_FP16
    assert list(half.shape) == [32, 784]
    assert len(raw.data) == 32 * 784 * 4
    assert len(half.data) == len(raw.data) // 2


def test_int8_size_is_quarter_plus_scales():
    x = _rng(4).standard_normal((32, 784)).astype(np.float32)
    raw = encode_array("fc1.weight", x, Encoding.parse("fp32"))
    q = encode_array("fc1.weight", x, Encoding.parse("int8"))
    assert len(q.data) == len(raw.data) // 4
    assert len(q.scales) == len(q.zero_points) == 32
    ratio = q.ByteSize() / raw.ByteSize()
    assert 0.25 <= ratio < 0.27, ratio


def test_int8_channel_layout():
    # 1-d and 0-d tensors are one channel; rank >= 2 has one per output channel.
    spec = Encoding.parse("int8")
    assert len(encode_array("b", np.ones(10, np.float32), spec).scales) == 1
    assert len(encode_array("s", np.float32(2.5).reshape(()), spec).scales) == 1
    assert len(encode_array("c", np.ones((8, 3, 5, 5), np.float32), spec).scales) == 8
    assert len(encode_array("e", np.ones((0, 3), np.float32), spec).scales) == 0


def test_int8_exact_cases():
    spec = Encoding.parse("int8")
    # zero is always exact; an all-zero channel uses scale 1.0
    x = np.zeros((2, 5), np.float32)
    x[1] = np.linspace(-1, 1, 5)
    t = encode_array("z", x, spec)
    assert t.scales[0] == 1.0
    y = decode_array(t)
    np.testing.assert_array_equal(y[0], 0.0)
    assert y[1, 2] == 0.0
    # a constant channel far from zero stays accurate (range widened to include 0)
    c = np.full((3,), 1.0e30, np.float32)
    yc = decode_array(encode_array("c", c, spec))
    assert np.max(np.abs(yc - c)) <= max_abs_error_bound(c, spec)
    # per-channel scales: a tiny channel is not swamped by a huge one
    w = np.stack([np.linspace(-1e-3, 1e-3, 50), np.linspace(-1e3, 1e3, 50)]).astype(np.float32)
    yw = decode_array(encode_array("w", w, spec))
    assert np.max(np.abs(yw[0] - w[0])) <= 1e-3 / 255


def test_int8_refuses_non_finite():
    x = np.array([1.0, np.nan], np.float32)
    with pytest.raises(CodecError, match="'bad'"):
        encode_array("bad", x, Encoding.parse("int8"))


def test_fp16_refuses_overflow_but_passes_inf_nan():
    with pytest.raises(CodecError, match=r"'big'.*overflows float16"):
        encode_array("big", np.array([1e6], np.float32), Encoding.parse("fp16"))
    x = np.array([np.inf, -np.inf, np.nan, 1.0], np.float32)
    y = decode_array(encode_array("s", x, Encoding.parse("fp16")))
    np.testing.assert_array_equal(y, x)


def test_raw_exact_for_special_values_and_big_endian_input():
    x = np.array([np.inf, -np.inf, np.nan, -0.0, 1e-45, 3.4e38], np.float32)
    y = _roundtrip(x, Encoding.parse("fp32+zstd"))
    np.testing.assert_array_equal(y.view(np.uint32), x.view(np.uint32))
    be = np.arange(6, dtype=">f4").reshape(2, 3)
    t = encode_array("be", be, Encoding())
    assert t.data == np.arange(6, dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode_array(t), be)


def test_non_contiguous_input():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2].T
    for spec in DENSE_ENCODINGS:
        y = decode_array(encode_array("v", x, spec))
        assert y.shape == x.shape
        assert np.max(np.abs(y - x)) <= max_abs_error_bound(x, spec)


@pytest.mark.parametrize("dtype", [np.float64, np.int16, np.bool_, np.complex64, object])
def test_unsupported_input_dtype(dtype):
    with pytest.raises(CodecError, match="'x': unsupported dtype"):
        encode_array("x", np.zeros(3, dtype=dtype), Encoding())


def test_state_order_and_determinism():
    rng = _rng(5)
    state = {
        "z.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "a.bias": rng.standard_normal(4).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, np.int64),
    }
    for spec in DENSE_ENCODINGS:
        bundle = encode_state(state, spec)
        assert [t.name for t in bundle.tensors] == list(state)
        b1, b2 = bundle_to_bytes(bundle), bundle_to_bytes(encode_state(state, spec))
        assert b1 == b2
        assert sha256_hex(b1) == sha256_hex(b2)
        out = decode_state(bundle_from_bytes(b1))
        assert list(out) == list(state)
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_zstd_level_and_compresses():
    assert ZSTD_LEVEL == 3
    x = np.zeros((64, 64), np.float32)
    t = encode_array("zeros", x, Encoding.parse("fp32+zstd"))
    assert len(t.data) < x.nbytes // 50
    assert zstandard.frame_content_size(t.data) == x.nbytes


# ---------------------------------------------------------------------------
# hypothesis

_finite_f32 = st.floats(min_value=-1.0e4, max_value=1.0e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    x=hnp.arrays(
        dtype=np.float32,
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        elements=_finite_f32,
    ),
    spec=st.sampled_from(DENSE_ENCODINGS),
)
def test_property_roundtrip_within_bound(x, spec):
    t = encode_array("p", x, spec)
    y = decode_array(bundle_from_bytes(bundle_to_bytes(tensor_pb2.TensorBundle(tensors=[t]))).tensors[0])
    assert y.shape == x.shape and y.dtype == np.float32
    if x.size:
        err = float(np.max(np.abs(y.astype(np.float64) - x.astype(np.float64))))
        assert err <= max_abs_error_bound(x, spec)
    if spec.codec == "fp32":
        assert max_abs_error_bound(x, spec) == 0.0
        np.testing.assert_array_equal(y, x)


# ---------------------------------------------------------------------------
# rejections


def _tensor(**kw) -> tensor_pb2.Tensor:
    base = {
        "name": "fc1.weight",
        "shape": [32],
        "dtype": tensor_pb2.DTYPE_FLOAT32,
        "encoding": tensor_pb2.ENCODING_RAW,
        "compression": tensor_pb2.COMPRESSION_NONE,
        "data": bytes(128),
    }
    base.update(kw)
    return tensor_pb2.Tensor(**base)


def test_valid_handmade_tensor_decodes():
    assert decode_array(_tensor()).shape == (32,)


def test_rejects_wrong_byte_length():
    with pytest.raises(CodecError) as exc:
        decode_array(_tensor(data=bytes(100)))
    assert str(exc.value) == ("tensor 'fc1.weight': data has 100 bytes, expected 128 for shape [32] float32")
    with pytest.raises(CodecError, match=r"'fc1.weight'.*expected 64"):
        decode_array(_tensor(encoding=tensor_pb2.ENCODING_FP16, data=bytes(128)))


@pytest.mark.parametrize(
    ("field", "value", "pattern"),
    [
        ("dtype", 0, "unsupported dtype DTYPE_UNSPECIFIED"),
        ("dtype", 42, "unsupported dtype unknown value 42"),
        ("encoding", 0, "unsupported encoding ENCODING_UNSPECIFIED"),
        ("encoding", 9, "unsupported encoding unknown value 9"),
        ("compression", 5, "unsupported compression unknown value 5"),
    ],
)
def test_rejects_unknown_enums(field, value, pattern):
    with pytest.raises(CodecError, match=f"tensor 'fc1.weight': {pattern}"):
        decode_array(_tensor(**{field: value}))


def test_rejects_lossy_encoding_on_integer_dtype():
    t = _tensor(dtype=tensor_pb2.DTYPE_INT64, encoding=tensor_pb2.ENCODING_FP16, data=bytes(64))
    with pytest.raises(CodecError, match=r"'fc1.weight'.*only valid for float dtypes"):
        decode_array(t)


@pytest.mark.parametrize("shape", [[-1], [4, -8], [2**40, 2**40], [2**62], [0, 2**62]])
def test_rejects_negative_or_huge_shape(shape):
    with pytest.raises(CodecError, match=r"'fc1.weight'"):
        decode_array(_tensor(shape=shape, data=b""))


def test_max_elements_is_enforced():
    with pytest.raises(CodecError, match=r"'fc1.weight': shape \[4, 8\] has 32 elements, more than 16"):
        decode_array(_tensor(shape=[4, 8]), max_elements=16)
    with pytest.raises(CodecError, match=r"'fc1.weight': dimension 32 at axis 0 exceeds max_elements 16"):
        decode_array(_tensor(), max_elements=16)


def test_int8_rejects_wrong_scales():
    x = _rng(6).standard_normal((4, 5)).astype(np.float32)
    good = encode_array("conv.w", x, Encoding.parse("int8"))
    decode_array(good)

    fewer = tensor_pb2.Tensor()
    fewer.CopyFrom(good)
    del fewer.scales[-1]
    with pytest.raises(CodecError, match=r"'conv.w': int8 needs 4 scales.*got 3 scales and 4"):
        decode_array(fewer)

    no_zp = tensor_pb2.Tensor()
    no_zp.CopyFrom(good)
    del no_zp.zero_points[:]
    with pytest.raises(CodecError, match=r"'conv.w'.*got 4 scales and 0 zero_points"):
        decode_array(no_zp)

    for bad in (0.0, -1.0, float("nan"), float("inf")):
        t = tensor_pb2.Tensor()
        t.CopyFrom(good)
        t.scales[0] = bad
        with pytest.raises(CodecError, match=r"'conv.w'.*scales must be finite and positive"):
            decode_array(t)

    stray = _tensor(scales=[1.0], zero_points=[0.0])
    with pytest.raises(CodecError, match=r"'fc1.weight'.*only allowed with ENCODING_INT8"):
        decode_array(stray)


def test_rejects_zstd_bomb_declared_size():
    # A tiny frame that declares (and really holds) 64 MiB for a 32-element tensor.
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    assert len(bomb) < 10_000
    t = _tensor(compression=tensor_pb2.COMPRESSION_ZSTD, data=bomb)
    with pytest.raises(CodecError, match=r"'fc1.weight': zstd frame declares 67108864 bytes, expected 128"):
        decode_array(t)


def test_rejects_zstd_bomb_without_declared_size():
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=False)
    bomb = cctx.compress(bytes(64 << 20))
    assert zstandard.frame_content_size(bomb) == -1
    t = _tensor(compression=tensor_pb2.COMPRESSION_ZSTD, data=bomb)
    with pytest.raises(CodecError, match=r"'fc1.weight': zstd decompression failed \(limit 128 bytes\)"):
        decode_array(t)
    # an empty tensor cannot be used to lift the limit either
    t0 = _tensor(shape=[0], compression=tensor_pb2.COMPRESSION_ZSTD, data=bomb)
    with pytest.raises(CodecError, match=r"'fc1.weight'"):
        decode_array(t0)


def test_rejects_short_or_garbage_zstd():
    short = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(bytes(100))
    with pytest.raises(CodecError, match=r"'fc1.weight': zstd frame holds 100 bytes, expected 128"):
        decode_array(_tensor(compression=tensor_pb2.COMPRESSION_ZSTD, data=short))
    with pytest.raises(CodecError, match=r"'fc1.weight': data is not a valid zstd frame"):
        decode_array(_tensor(compression=tensor_pb2.COMPRESSION_ZSTD, data=b"not zstd at all"))
    two = zstandard.ZstdCompressor().compress(bytes(128)) * 2
    with pytest.raises(CodecError, match=r"'fc1.weight'"):
        decode_array(_tensor(compression=tensor_pb2.COMPRESSION_ZSTD, data=two))


@pytest.mark.parametrize(
    "data", [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05\x0a\x03ab", b"\x0a\x02\x0a\x02\xff\xfe"]
)
def test_bundle_from_bytes_rejects_garbage(data):
    with pytest.raises(CodecError, match=r"^malformed TensorBundle: "):
        bundle_from_bytes(data)


def test_decode_state_rejects_duplicate_names():
    a = encode_array("dup", np.zeros(2, np.float32), Encoding())
    bundle = tensor_pb2.TensorBundle(tensors=[a, a])
    with pytest.raises(CodecError, match="tensor 'dup': duplicate name"):
        decode_state(bundle_from_bytes(bundle_to_bytes(bundle)))


@pytest.mark.integration
def test_codec_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, fedgen.export.codec; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_zstd_is_kept_only_where_it_makes_a_tensor_smaller():
    spec = Encoding.parse("int8+zstd")
    noisy = encode_array("noisy", _rng(3).standard_normal((16, 16)).astype(np.float32), spec)
    smooth = encode_array("smooth", np.zeros((64, 64), np.float32), spec)
    assert noisy.compression == tensor_pb2.COMPRESSION_NONE and len(noisy.data) == 256
    assert smooth.compression == tensor_pb2.COMPRESSION_ZSTD and len(smooth.data) < 64 * 64
    for t in (noisy, smooth):
        assert decode_array(t).shape == tuple(t.shape)
