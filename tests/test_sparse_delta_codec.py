"""Top-k sparsification, deltas against a held model, and error feedback (export.codec)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from export.codec import (CodecError, EncodingSpec, ErrorFeedback, apply_delta, bundle_from_bytes, bundle_to_bytes,
                          decode_array, decode_state, encode_array, encode_state, state_delta, topk_count)
from fedgen.v1 import tensor_pb2

BASE = "ab" * 32


@pytest.mark.parametrize("text,density,name", [("topk10", 0.1, "topk10"), ("TOPK2.5+zstd", 0.025, "topk2.5+zstd"),
                                               ("topk100", 1.0, "topk100")])
def test_topk_spec_parse_and_name(text: str, density: float, name: str) -> None:
    spec = EncodingSpec.parse(text)
    assert spec.sparse and spec.density == pytest.approx(density) and spec.name == name


@pytest.mark.parametrize("bad", ["topk", "topk0", "topk101", "topk-5", "topkx", "topk10+gzip"])
def test_topk_spec_rejects_bad_percentages(bad: str) -> None:
    with pytest.raises(ValueError, match="topk<percent>"):
        EncodingSpec.parse(bad)


def test_topk_keeps_exactly_the_largest_entries_within_an_int8_step() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 5, 5)).astype(np.float32)
    t = encode_array("w", x, EncodingSpec.parse("topk10"))
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
        y = decode_array(encode_array("t", x, EncodingSpec.parse("topk10+zstd")))
        assert y.shape == x.shape
        if x.size:
            i = np.argmax(np.abs(x))
            want = float(x.ravel()[i])
            assert float(y.ravel()[i]) == pytest.approx(want, abs=abs(want) / 127)


def _topk_tensor(**changes: object) -> tensor_pb2.Tensor:
    t = encode_array("w", np.arange(20, dtype=np.float32) - 10, EncodingSpec.parse("topk25"))
    for key, value in changes.items():
        if key in ("scales", "zero_points"):
            getattr(t, key)[:] = value
        else:
            setattr(t, key, value)
    return t


@pytest.mark.parametrize("changes,pattern", [
    ({"data": b"\x01"}, "less than its 3-byte bitmap"),
    ({"data": b"\xff\xff\x0f" + b"\x00" * 3}, "value bytes, the bitmap marks 20"),
    ({"data": b"\x00\x00\xf0"}, "beyond the tensor's 20 elements"),
    ({"scales": [0.0]}, "scale must be finite and positive"),
    ({"scales": [1.0, 2.0]}, "needs 1 scale"),
])
def test_malformed_topk_tensors_are_clear_errors(changes: dict, pattern: str) -> None:
    with pytest.raises(CodecError, match=pattern):
        decode_array(_topk_tensor(**changes))


def test_delta_round_trip_and_base_digest() -> None:
    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal((8, 4)).astype(np.float32), "n": np.array(7, dtype=np.int64)}
    new = {"w": base["w"] + 0.01 * rng.standard_normal((8, 4)).astype(np.float32), "n": np.array(9, dtype=np.int64)}
    bundle = bundle_from_bytes(bundle_to_bytes(encode_state(state_delta(new, base), EncodingSpec(), BASE)))
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
@given(deltas=st.lists(hnp.arrays(np.float32, (6, 7), elements=st.floats(-1, 1, width=32)), min_size=1, max_size=8),
       percent=st.sampled_from([1, 10, 50]))
def test_error_feedback_loses_nothing_over_rounds(deltas: list[np.ndarray], percent: int) -> None:
    """Sum of what was sent + what is still held back == sum of what was meant to be sent."""
    ef = ErrorFeedback()
    spec = EncodingSpec.parse(f"topk{percent}+zstd")
    sent = np.zeros((6, 7), np.float32)
    for d in deltas:
        sent += decode_state(ef.encode({"w": d}, spec, BASE))["w"]
    np.testing.assert_allclose(sent + ef.residual["w"], np.sum(deltas, axis=0), atol=1e-4)


def test_error_feedback_eventually_sends_a_small_persistent_direction() -> None:
    """A coordinate too small to make the top 10% in any one round still gets through."""
    ef = ErrorFeedback()
    spec = EncodingSpec.parse("topk10")
    delta = np.full(100, 0.01, np.float32)
    delta[:10] = 1.0  # the big ones always win a single round
    got = np.zeros(100, np.float32)
    for _ in range(200):
        got += decode_state(ef.encode({"w": delta}, spec, BASE))["w"]
    assert got[50] > 0.5  # 200 rounds x 0.01 = 2.0 meant; most of it has arrived
