from __future__ import annotations

import numpy as np
import pytest

from fedgen.coordinator.config import ConfigError, TrainingConfig, parse_config
from fedgen.coordinator.evaluation import task_contract
from fedgen.coordinator.robust import weighted_average
from fedgen.coordinator.strategy import ClientResult, FedAvg, FedProx, make_strategy
from fedgen.coordinator.validation import UpdateRejected, validate_counts, validate_state
from fedgen.core.task import prepare


def test_weighted_average_weights_by_examples() -> None:
    a = {"w": np.array([0.0, 2.0], dtype=np.float32), "n": np.array(3, dtype=np.int64)}
    b = {"w": np.array([4.0, 6.0], dtype=np.float32), "n": np.array(7, dtype=np.int64)}
    out = weighted_average([(a, 1), (b, 3)])
    np.testing.assert_allclose(out["w"], [3.0, 5.0])
    assert out["w"].dtype == np.float32
    assert out["n"] == 7 and out["n"].dtype == np.int64  # counters keep the largest


def test_weighted_average_of_one_is_identity() -> None:
    a = {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(weighted_average([(a, 5)])["w"], a["w"])


def test_weighted_average_rejects_empty_and_zero_weight() -> None:
    with pytest.raises(ValueError, match="cannot average zero states"):
        weighted_average([])
    with pytest.raises(ValueError, match="total weight must be positive, got 0"):
        weighted_average([({"w": np.zeros(1, np.float32)}, 0)])


def test_fedavg_strategy_and_schedule() -> None:
    s = FedAvg(TrainingConfig(learning_rate=0.1, lr_decay=0.5))
    assert s.configure_round(2).learning_rate == pytest.approx(0.025)
    results = [ClientResult(f"c{i}", {"w": np.full(2, float(i), np.float32)}, i, [0] * 10, {}) for i in (1, 3)]
    np.testing.assert_allclose(s.aggregate_round(0, results, {}).state["w"], [2.5, 2.5])


def test_fedprox_sends_mu_and_unknown_strategy_is_an_error() -> None:
    assert FedProx(TrainingConfig(proximal_mu=0.01)).configure_round(0).params == {"proximal_mu": 0.01}
    assert isinstance(
        make_strategy(parse_config({"federation": {"strategy": "fedprox"}}), task_contract(prepare("mnist"))), FedProx
    )
    with pytest.raises(ConfigError, match=r"federation\.strategy: Input should be 'fedavg', 'fedprox' or 'fedgen'"):
        parse_config({"federation": {"strategy": "nope"}})


SPEC = {"fc.weight": ((2, 3), np.dtype("float32")), "bn.n": ((), np.dtype("int64"))}


def _state(**over: np.ndarray) -> dict[str, np.ndarray]:
    s = {"fc.weight": np.zeros((2, 3), np.float32), "bn.n": np.array(1, np.int64)}
    s.update(over)
    return s


@pytest.mark.parametrize(
    ("state", "needle"),
    [
        (_state(**{"fc.weight": np.zeros((3, 2), np.float32)}), "'fc.weight' has shape [3, 2], expected [2, 3]"),
        (_state(**{"fc.weight": np.zeros((2, 3), np.float16)}), "'fc.weight' has dtype float16"),
        (_state(**{"fc.weight": np.full((2, 3), np.nan, np.float32)}), "'fc.weight' has 6 non-finite"),
        ({"fc.weight": np.zeros((2, 3), np.float32)}, "missing tensor(s) ['bn.n']"),
        (_state(extra=np.zeros(1, np.float32)), "unexpected tensor(s) ['extra']"),
    ],
)
def test_validate_state_names_the_tensor(state: dict, needle: str) -> None:
    with pytest.raises(UpdateRejected) as err:
        validate_state(state, SPEC)
    assert needle in str(err.value)


def test_validate_counts() -> None:
    validate_counts(10, [1] * 10, 10)
    for n, counts, needle in [(0, [1] * 10, "positive"), (10**9, [1] * 10, "exceeds"), (5, [1] * 9, "9 entries")]:
        with pytest.raises(UpdateRejected, match=needle):
            validate_counts(n, counts, 10)


def test_label_counts_must_fit_what_the_task_let_the_client_train() -> None:
    validate_counts(5000, [64] * 10, 10, max_trained=640)
    with pytest.raises(UpdateRejected, match="all zero"):
        validate_counts(10, [0] * 10, 10, max_trained=640)
    with pytest.raises(UpdateRejected, match="sum to 650, more than the 640 examples"):
        validate_counts(5000, [65] * 10, 10, max_trained=640)
