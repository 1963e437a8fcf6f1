"""Robust aggregation: each defence against the attacks it exists for, and the config's ranges."""

from __future__ import annotations

import numpy as np
import pytest

from fedgen.coordinator.config import ConfigError, parse_config
from fedgen.coordinator.evaluation import task_contract
from fedgen.coordinator.model import ModelContract
from fedgen.coordinator.robust import (
    Contribution,
    RobustError,
    RobustSettings,
    aggregate,
    clip_state,
    first_non_finite,
    krum_scores,
    screen,
)
from fedgen.coordinator.strategy import ClientResult, make_strategy
from fedgen.core.task import prepare

GLOBAL = {"w": np.zeros(4, np.float32), "steps": np.array(7, np.int64)}


def honest(i: int, n: float = 100.0) -> Contribution:
    rng = np.random.default_rng(i)
    return Contribution(
        f"c{i}", {"w": (1.0 + 0.01 * rng.standard_normal(4)).astype(np.float32), "steps": np.array(8, np.int64)}, n
    )


def hostile(value: float, n: float = 100.0, steps: int = 10**9) -> Contribution:
    return Contribution("evil", {"w": np.full(4, value, np.float32), "steps": np.array(steps, np.int64)}, n)


def combine(settings: RobustSettings, cohort: list[Contribution], max_trained: int = 640) -> np.ndarray:
    return aggregate(settings, screen(settings, cohort, GLOBAL, max_trained))["w"]


def test_plain_mean_is_what_one_client_controls() -> None:
    """The attack this module exists for: under FedAvg's mean one scaled update sets the model."""
    cohort = [honest(i) for i in range(4)] + [hostile(1e30)]
    assert combine(RobustSettings(), cohort).min() > 1e28


@pytest.mark.parametrize(
    "settings",
    [
        RobustSettings(aggregator="median"),
        RobustSettings(aggregator="trimmed-mean", trim_fraction=0.2),
        RobustSettings(aggregator="krum", byzantine=1),
        RobustSettings(aggregator="multi-krum", byzantine=1),
    ],
    ids=lambda s: s.aggregator,
)
@pytest.mark.parametrize("value", [1e30, 0.0, -50.0])
def test_robust_aggregators_ignore_one_attacker(settings: RobustSettings, value: float) -> None:
    cohort = [honest(i) for i in range(4)] + [hostile(value)]
    out = combine(settings, cohort)
    assert np.all(np.abs(out - 1.0) < 0.05), out


def test_integer_counters_take_the_median_under_robust_aggregators() -> None:
    cohort = [honest(i) for i in range(4)] + [hostile(1.0)]
    s = RobustSettings(aggregator="median")
    assert int(aggregate(s, screen(s, cohort, GLOBAL, 640))["steps"]) == 8
    assert int(aggregate(RobustSettings(), screen(RobustSettings(), cohort, GLOBAL, 640))["steps"]) == 10**9


def test_clipping_bounds_the_update_not_the_state() -> None:
    g = {"w": np.full(4, 10.0, np.float32)}
    clipped, norm = clip_state({"w": np.full(4, 12.0, np.float32)}, g, ["w"], max_norm=1.0)
    assert norm == pytest.approx(4.0)
    np.testing.assert_allclose(clipped["w"], 10.5, rtol=1e-6)  # 10 + 2 * (1 / 4)
    same, _ = clip_state({"w": np.full(4, 10.25, np.float32)}, g, ["w"], max_norm=1.0)
    np.testing.assert_array_equal(same["w"], 10.25)


def test_clipping_limits_a_scaled_update_under_the_mean() -> None:
    s = RobustSettings(clip_norm=3.0)  # honest updates have norm about 2
    screened = screen(s, [honest(i) for i in range(4)] + [hostile(1e30)], GLOBAL, 640)
    assert screened.clipped == ["evil"] and screened.max_norm > 1e30
    out = aggregate(s, screened)["w"]
    assert np.all(np.abs(out) < 1.4)  # the attacker moves the mean by at most 1.5 / 5 per coordinate
    assert screened.extras() == {
        "robust_clipped_updates": 1.0,
        "robust_excluded_updates": 0.0,
        "robust_max_update_norm": pytest.approx(2e30, rel=1e-6),
    }


def test_a_lying_example_count_buys_nothing_with_capped_weights() -> None:
    cohort = [honest(i, n=2000) for i in range(4)] + [hostile(-1.0, n=1e8)]
    assert combine(RobustSettings(), cohort).mean() < -0.99  # the lie wins under the plain mean
    capped = combine(RobustSettings(cap_weights=True), cohort)  # 640 each (20 steps x 32): one of five
    np.testing.assert_allclose(capped, (4 * 1.0 - 1.0) / 5, atol=0.02)


def test_krum_excludes_the_outlier_and_needs_enough_updates() -> None:
    s = RobustSettings(aggregator="multi-krum", byzantine=1)
    screened = screen(s, [honest(i) for i in range(4)] + [hostile(5.0)], GLOBAL, 640)
    assert screened.excluded == ["evil"]
    scores = krum_scores(np.array([[0.0], [0.1], [0.2], [10.0], [0.15]]), byzantine=1)
    assert int(np.argmax(scores)) == 3
    with pytest.raises(RobustError, match=r"krum with byzantine = 1 needs at least 5 updates, the round has 4"):
        screen(RobustSettings(aggregator="krum"), [honest(i) for i in range(4)], GLOBAL, 640)


def test_first_non_finite_names_the_tensor() -> None:
    assert first_non_finite(GLOBAL) is None
    assert first_non_finite({"a": np.ones(2, np.float32), "b": np.array([1.0, np.inf], np.float32)}) == "b"


def test_config_checks_ranges_and_that_a_round_can_meet_the_aggregator() -> None:
    ok = parse_config({"robust": {"aggregator": "krum", "byzantine": 1}, "federation": {"min_completed": 5}})
    assert ok.robust.settings().min_updates() == 5
    with pytest.raises(ConfigError, match=r"needs at least 7 updates a round: set federation.min_completed >= 7"):
        parse_config({"robust": {"aggregator": "multi-krum", "byzantine": 2}, "federation": {"min_completed": 3}})
    with pytest.raises(ConfigError, match=r"robust.trim_fraction"):
        parse_config({"robust": {"trim_fraction": 0.5}})
    with pytest.raises(ConfigError, match=r"robust.clip_norm"):
        parse_config({"robust": {"clip_norm": float("inf")}})
    with pytest.raises(ConfigError, match=r"robust.aggregator"):
        parse_config({"robust": {"aggregator": "mode"}})
    with pytest.raises(ConfigError, match=r"multi_krum_keep \(5\) must leave out the 1 possible attacker"):
        parse_config({"robust": {"aggregator": "multi-krum", "multi_krum_keep": 5}, "federation": {"min_completed": 5}})


def _contract() -> ModelContract:
    return task_contract(prepare("mnist"))


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedgen"])
def test_every_strategy_composes_with_the_defences(strategy: str) -> None:
    config = parse_config(
        {
            "federation": {"strategy": strategy, "min_completed": 3, "clients_per_round": 4},
            "robust": {"aggregator": "median", "clip_norm": 5.0, "cap_weights": True},
        }
    )
    contract = _contract()
    s = make_strategy(config, contract)
    global_state = contract.initial_state(0)
    results = []
    for i in range(3):
        rng = np.random.default_rng(i)
        state = {k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in global_state.items()}
        results.append(ClientResult(f"c{i}", state, 500, [64] * 10, {}))
    evil = {k: np.full_like(v, 1e30) if v.dtype.kind == "f" else v for k, v in global_state.items()}
    results.append(ClientResult("evil", evil, 10**8, [64] * 10, {}))
    agg = s.aggregate_round(0, results, global_state)
    assert set(s.metric_names()) >= {"robust_clipped_updates", "robust_max_update_norm"}
    assert agg.extras["robust_clipped_updates"] >= 1
    assert all(np.all(np.abs(v.astype(np.float64) - global_state[k]) < 1.0) for k, v in agg.state.items())
