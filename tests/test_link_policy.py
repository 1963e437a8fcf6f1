"""The link policy is a pure function: budgets, ladders and estimates, no network."""

from __future__ import annotations

import pytest

from fedgen.coordinator.link_policy import Link, LinkEstimator, Rung, Transfer, choose_encodings
from fedgen.export.encoding import Encoding


def R(name: str, size: int) -> Rung:
    return Rung(Encoding.parse(name), size)


MODEL = Transfer("model", "down", (R("fp32+zstd", 100_000), R("fp16+zstd", 50_000), R("int8+zstd", 27_000)))
GEN = Transfer("generator", "down", (R("fp32+zstd", 72_000), R("int8+zstd", 22_000)))
UP = Transfer("upload", "up", (R("fp32", 107_000), R("int8+zstd", 27_000), R("topk10+zstd", 9_000)))


def test_no_budget_keeps_the_most_faithful_encodings() -> None:
    plan = choose_encodings([MODEL, GEN, UP], Link(1e3, 1e3), budget_s=0)
    assert plan.names == {"model": "fp32+zstd", "generator": "fp32+zstd", "upload": "fp32"}
    assert plan.fits


def test_a_fast_link_keeps_everything_exact() -> None:
    plan = choose_encodings([MODEL, GEN, UP], Link(100e6, 100e6), budget_s=1.0)
    assert plan.names == {"model": "fp32+zstd", "generator": "fp32+zstd", "upload": "fp32"}
    assert plan.fits and plan.expected_s == pytest.approx(8 * 279_000 / 100e6)


def test_the_transfer_that_saves_most_steps_down_first() -> None:
    # 1 Mbit/s both ways: 279 KB is 2.23 s. Dropping the upload to int8 saves 0.64 s, the most.
    plan = choose_encodings([MODEL, GEN, UP], Link(1e6, 1e6), budget_s=1.7)
    assert plan.names == {"model": "fp32+zstd", "generator": "fp32+zstd", "upload": "int8+zstd"}
    assert plan.expected_s <= 1.7


def test_a_slow_uplink_degrades_the_upload_not_the_downloads() -> None:
    plan = choose_encodings([MODEL, GEN, UP], Link(50e6, 0.1e6), budget_s=1.0)
    assert plan.names["model"] == "fp32+zstd" and plan.names["generator"] == "fp32+zstd"
    assert plan.names["upload"] == "topk10+zstd"
    assert plan.fits


def test_over_budget_even_at_the_bottom_returns_the_most_compact_plan_marked_unfit() -> None:
    plan = choose_encodings([MODEL, GEN, UP], Link(1e4, 1e4), budget_s=1.0)
    assert plan.names == {"model": "int8+zstd", "generator": "int8+zstd", "upload": "topk10+zstd"}
    assert not plan.fits and plan.expected_s > 1.0


def test_a_larger_rung_is_never_chosen_to_save_time() -> None:
    odd = Transfer("model", "down", (R("fp32", 100_000), R("fp32+zstd", 120_000), R("int8", 25_000)))
    plan = choose_encodings([odd], Link(1e6, 1e6), budget_s=0.5)
    assert plan.names == {"model": "int8"}


def test_latency_counts_once_per_transfer() -> None:
    assert Link(8e6, 8e6, latency_s=0.1).seconds("down", 1_000_000) == pytest.approx(1.1)


def test_estimator_is_seeded_by_the_profile_then_follows_measurements() -> None:
    est = LinkEstimator(weight=0.5, assumed_bps=20e6)
    assert est.link("a").down_bps == 20e6
    est.seed("a", 1e6, 0)
    assert est.link("a").down_bps == 1e6 and est.link("a").up_bps == 20e6
    assert est.observe("a", "down", 100_000, 0.4) == pytest.approx(2e6)
    assert est.link("a").down_bps == pytest.approx(2e6)  # the first measurement replaces the claim
    est.observe("a", "down", 100_000, 0.8)
    assert est.link("a").down_bps == pytest.approx(1.5e6)  # later ones are averaged in
    est.seed("a", 9e6, 9e6)  # a re-join does not overwrite what was learned
    assert est.link("a").down_bps == pytest.approx(1.5e6)


@pytest.mark.parametrize(("nbytes", "seconds"), [(100, 0.1), (100_000, 0.0), (100_000, float("nan")), (100_000, -1)])
def test_estimator_ignores_what_it_cannot_learn_from(nbytes: int, seconds: float) -> None:
    est = LinkEstimator(assumed_bps=5e6)
    assert est.observe("a", "up", nbytes, seconds) is None
    assert est.link("a").up_bps == 5e6


def test_a_download_teaches_rate_from_its_later_chunks_and_latency_from_its_first() -> None:
    from fedgen.coordinator.link_policy import DownloadTiming

    est = LinkEstimator(weight=1.0)
    # 1 Mbit/s with 0.2 s of request latency: a 64 KB first chunk at 0.2 + 0.524 s, 100 KB more in 0.8 s.
    est.observe_download(
        "a", DownloadTiming(wire_bytes=165_536, seconds=1.524, first_chunk_seconds=0.724, first_chunk_bytes=65_536)
    )
    link = est.link("a")
    assert link.down_bps == pytest.approx(1e6, rel=1e-3)
    assert link.latency_s == pytest.approx(0.2, abs=1e-3)
    assert link.seconds("down", 125_000) == pytest.approx(1.2, abs=1e-3)


def test_malformed_download_timings_teach_nothing() -> None:
    from fedgen.coordinator.link_policy import DownloadTiming

    est = LinkEstimator(assumed_bps=5e6)
    for bad in (
        DownloadTiming(100_000, 1.0, 2.0, 10),
        DownloadTiming(100_000, float("inf"), 0, 0),
        DownloadTiming(100, 1.0, 0.5, 200),
    ):
        assert not bad.valid()
        est.observe_download("a", bad)
    assert est.link("a").down_bps == 5e6 and est.link("a").latency_s == est.assumed_latency_s
