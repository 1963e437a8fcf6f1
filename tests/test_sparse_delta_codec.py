"""Top-k sparsification, deltas against a held model, and error feedback (fedgen.export.codec)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedgen.export.codec import (
    CodecError,
    Encoding,
    ErrorFeedback,
    apply_delta,
    bundle_from_bytes,
    bundle_to_bytes,
    decode_array,
    decode_state,
    encode_array,
    encode_state,
    state_delta,
)
from fedgen.export.tensor_codecs import topk_count
from fedgen.v1 import fleet_pb2, tensor_pb2

BASE = "ab" * 32


@pytest.mark.parametrize(
    ("text", "density", "name"),
    [("topk10", 0.1, "topk10"), ("TOPK2.5+zstd", 0.025, "topk2.5+zstd"), ("topk100", 1.0, "topk100")],
)
def test_topk_spec_parse_and_name(text: str, density: float, name: str) -> None:
    spec = Encoding.parse(text)
    assert spec.sparse and spec.density == pytest.approx(density) and spec.name == name


@pytest.mark.parametrize("bad", ["topk", "topk0", "topk101", "topk-5", "topkx", "topk10+gzip"])
def test_topk_spec_rejects_bad_percentages(bad: str) -> None:
    with pytest.raises(ValueError, match="topk<percent>"):
        Encoding.parse(bad)


def test_topk_keeps_exactly_the_largest_entries_within_an_int8_step() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 5, 5)).astype(np.float32)
    t = encode_array("w", x, Encoding.parse("topk10"))
    y = decode_array(t)
    k = topk_count(x.size, 0.1)
    kept = y != 0
    assert kept.sum() <= k  # a kept value may quantise to exactly 0, never more than k survive
    threshold = np.sort(np.abs(x).ravel())[-k]
    assert np.all(np.abs(x[kept]) >= threshold)
    step = (x[np.abs(x) >= threshold].max() - min(x[np.abs(x) >= threshold].min(), 0)) / 255
    assert np.abs(y[kept] - x[kept]).max() <= step / 2 + 1e-6
    assert y.dtype == np.float32 and y.shape == x.shape
    # bitmap (1 bit per element) + one byte per kept element
    assert len(t.data) == (x.size + 7) // 8 + k
    assert len(t.data) < 0.16 * x.nbytes


def test_topk_of_tiny_and_empty_tensors() -> None:
    for x in (np.float32(3.5).reshape(()), np.zeros(0, np.float32), np.array([0.0, -2.0, 1.0], np.float32)):
        y = decode_array(encode_array("t", x, Encoding.parse("topk10+zstd")))
        assert y.shape == x.shape
        if x.size:
            i = np.argmax(np.abs(x))
            want = float(x.ravel()[i])
            assert float(y.ravel()[i]) == pytest.approx(want, abs=abs(want) / 127)


def _topk_tensor(**changes: object) -> tensor_pb2.Tensor:
    t = encode_array("w", np.arange(20, dtype=np.float32) - 10, Encoding.parse("topk25"))
    for key, value in changes.items():
        if key in ("scales", "zero_points"):
            getattr(t, key)[:] = value
        else:
            setattr(t, key, value)
    return t


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"data": b"\x01"}, "less than its 3-byte bitmap"),
        ({"data": b"\xff\xff\x0f" + b"\x00" * 3}, "value bytes, the bitmap marks 20"),
        ({"data": b"\x00\x00\xf0"}, "beyond the tensor's 20 elements"),
        ({"scales": [0.0]}, "scale must be finite and positive"),
        ({"scales": [1.0, 2.0]}, "needs 1 scale"),
    ],
)
def test_malformed_topk_tensors_are_clear_errors(changes: dict, pattern: str) -> None:
    with pytest.raises(CodecError, match=pattern):
        decode_array(_topk_tensor(**changes))


def test_delta_round_trip_and_base_digest() -> None:
    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal((8, 4)).astype(np.float32), "n": np.array(7, dtype=np.int64)}
    new = {"w": base["w"] + 0.01 * rng.standard_normal((8, 4)).astype(np.float32), "n": np.array(9, dtype=np.int64)}
    bundle = bundle_from_bytes(bundle_to_bytes(encode_state(state_delta(new, base), Encoding(), BASE)))
    assert bundle.base_sha256 == BASE
    out = apply_delta(base, decode_state(bundle))
    assert out["n"] == 9 and out["n"].dtype == np.int64
    np.testing.assert_allclose(out["w"], new["w"], atol=1e-6)


def test_delta_against_the_wrong_base_is_refused() -> None:
    base = {"w": np.zeros((2, 2), np.float32)}
    with pytest.raises(CodecError, match="missing"):
        apply_delta(base, {"v": np.zeros((2, 2), np.float32)})
    with pytest.raises(CodecError, match="shape"):
        apply_delta(base, {"w": np.zeros((2, 3), np.float32)})


@settings(max_examples=40, deadline=None)
@given(
    deltas=st.lists(hnp.arrays(np.float32, (6, 7), elements=st.floats(-1, 1, width=32)), min_size=1, max_size=8),
    percent=st.sampled_from([1, 10, 50]),
)
def test_error_feedback_loses_nothing_over_rounds(deltas: list[np.ndarray], percent: int) -> None:
    """Sum of what was sent + what is still held back == sum of what was meant to be sent."""
    ef = ErrorFeedback()
    spec = Encoding.parse(f"topk{percent}+zstd")
    sent = np.zeros((6, 7), np.float32)
    for d in deltas:
        sent += decode_state(ef.encode({"w": d}, spec, BASE))["w"]
    np.testing.assert_allclose(sent + ef.residual["w"], np.sum(deltas, axis=0), atol=1e-4)


def test_error_feedback_eventually_sends_a_small_persistent_direction() -> None:
    """A coordinate too small to make the top 10% in any one round still gets through."""
    ef = ErrorFeedback()
    spec = Encoding.parse("topk10")
    delta = np.full(100, 0.01, np.float32)
    delta[:10] = 1.0  # the big ones always win a single round
    got = np.zeros(100, np.float32)
    for _ in range(200):
        got += decode_state(ef.encode({"w": delta}, spec, BASE))["w"]
    assert got[50] > 0.5  # 200 rounds x 0.01 = 2.0 meant; most of it has arrived


@settings(max_examples=300, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    data=st.data(),
    scale=st.floats(1e-6, 1e6) | st.floats(allow_nan=True, allow_infinity=True),
    zero=st.floats(-128, 127) | st.floats(allow_nan=True, allow_infinity=True),
    corruption=st.sampled_from(["none", "truncate", "extend", "flip", "stray_bit"]),
    compressed=st.booleans(),
)
def test_hostile_topk_tensors_decode_or_raise_codec_error(
    shape: list[int], data: st.DataObject, scale: float, zero: float, corruption: str, compressed: bool
) -> None:
    """A well-formed top-k tensor decodes to exactly its kept values; whatever else a sender puts in
    one, the decoder answers a CodecError or an array of the declared shape (values that overflow
    float32 are the update validator's to refuse, as for int8)."""
    count = math.prod(shape)
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=count, max_size=count)), dtype=bool)
    codes = data.draw(st.binary(min_size=int(keep.sum()), max_size=int(keep.sum())))
    payload = bytearray(np.packbits(keep, bitorder="little").tobytes() + codes)
    must_fail = False
    if corruption == "truncate" and payload:
        payload = payload[:-1]
        must_fail = True
    elif corruption == "extend":
        payload += b"\x01"
        must_fail = True
    elif corruption == "flip" and payload:
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= 1 << data.draw(st.integers(0, 7))
    elif corruption == "stray_bit" and count % 8:
        payload[(count - 1) // 8] |= 0x80  # a position past the tensor's last element
        must_fail = True
    t = tensor_pb2.Tensor(
        name="w",
        shape=shape,
        dtype=tensor_pb2.DTYPE_FLOAT32,
        encoding=tensor_pb2.ENCODING_TOPK_INT8,
        compression=tensor_pb2.COMPRESSION_ZSTD if compressed else tensor_pb2.COMPRESSION_NONE,
        data=zstandard.ZstdCompressor().compress(bytes(payload)) if compressed else bytes(payload),
        scales=[scale],
        zero_points=[zero],
    )
    with np.errstate(over="ignore"):
        scale, zero = float(np.float32(scale)), float(np.float32(zero))  # what the proto's float fields hold
    params_valid = math.isfinite(scale) and scale > 0 and math.isfinite(zero)
    if corruption == "none" and params_valid:
        expected = np.zeros(count, dtype=np.float32)
        with np.errstate(over="ignore"):
            expected[keep] = (np.frombuffer(codes, np.int8).astype(np.float32) - np.float32(zero)) * np.float32(scale)
        np.testing.assert_array_equal(decode_array(t), expected.reshape(shape))
        return
    try:
        out = decode_array(t)
    except CodecError:
        return
    assert not must_fail and params_valid, f"{corruption} with scale {scale}, zero {zero} decoded"
    assert out.shape == tuple(shape) and out.dtype == np.float32


def _task(upload_encoding: str) -> fleet_pb2.TrainTask:
    return fleet_pb2.TrainTask(
        round=3,
        config=fleet_pb2.TrainConfig(upload_encoding=upload_encoding),
        global_model=fleet_pb2.ArtifactRef(artifact_id=BASE),
    )


def test_the_client_encodes_its_update_as_asked_and_falls_back_to_fp32() -> None:
    from fedgen.edge.runner import _encode_update

    rng = np.random.default_rng(4)
    received = {
        "w": rng.standard_normal((16, 8)).astype(np.float32),
        "bn.running_var": np.ones(8, np.float32),
        "bn.num_batches_tracked": np.array(5, np.int64),
    }
    trained = {
        "w": received["w"] + 0.01,
        "bn.running_var": np.full(8, 1.5, np.float32),
        "bn.num_batches_tracked": np.array(25, np.int64),
    }
    buffers = frozenset({"bn.running_var", "bn.num_batches_tracked"})
    for name in ("", "fp32", "no-such-encoding"):  # fp32: the whole state, exact
        bundle = bundle_from_bytes(_encode_update(trained, received, _task(name), ErrorFeedback(), buffers))
        assert bundle.base_sha256 == ""
        assert all(np.array_equal(v, trained[k]) for k, v in decode_state(bundle).items())
    feedback = ErrorFeedback()
    bundle = bundle_from_bytes(_encode_update(trained, received, _task("topk10+zstd"), feedback, buffers))
    assert bundle.base_sha256 == BASE
    rebuilt = apply_delta(received, decode_state(bundle))
    # BatchNorm statistics exact and outside the error feedback; the weights sparse, the rest held back.
    np.testing.assert_allclose(rebuilt["bn.running_var"], trained["bn.running_var"])
    assert rebuilt["bn.num_batches_tracked"] == 25
    assert set(feedback.residual) == {"w"} and np.abs(feedback.residual["w"]).max() > 0
