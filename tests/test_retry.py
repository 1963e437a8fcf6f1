"""Refusals that mean "try later" are retried, with jitter and the server's pushback as a floor;
the others surface at once. The policy is shared by the edge client and the load benchmark."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation
from fedgen.core.retry import PUSHBACK_TRAILER, RetryPolicy, is_overload, pushback_s
from fedgen.edge.connection import FleetCallError, FleetConnection
from fedgen.v1 import fleet_pb2

TOKEN = "retry-test-enrollment-token"


class _Refusal(grpc.RpcError):
    """A status as a client sees it (what grpc raises carries the same three accessors)."""

    def __init__(self, code: grpc.StatusCode, details: str = "", pushback_ms: int | None = None) -> None:
        self._code, self._details = code, details
        self._trailers = () if pushback_ms is None else ((PUSHBACK_TRAILER, str(pushback_ms)),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailers


POLICY = RetryPolicy(initial_backoff_s=0.5, max_backoff_s=15.0)


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED]
)
def test_try_later_codes_back_off_with_full_jitter(code: grpc.StatusCode) -> None:
    rng = random.Random(0)
    for attempt in range(8):
        waits = [POLICY.delay(_Refusal(code), attempt, rng) for _ in range(200)]
        cap = min(15.0, 0.5 * 2**attempt)
        assert all(w is not None and 0 <= w <= cap for w in waits)
        assert max(w or 0 for w in waits) > 0.8 * cap  # spread over the whole window, not clustered
        assert len({round(w or 0, 6) for w in waits}) > 150


def test_a_servers_pushback_is_a_floor_jittered_upward() -> None:
    rng = random.Random(1)
    for code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
        waits = [POLICY.delay(_Refusal(code, "busy", pushback_ms=2000), 0, rng) for _ in range(200)]
        assert all(w is not None and 2.0 <= w <= 3.0 for w in waits)
    assert pushback_s(_Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, pushback_ms=250)) == 0.25


def test_grpcs_own_overload_refusals_are_retried_other_exhaustion_is_not() -> None:
    rng = random.Random(2)
    busy = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "Too many pending requests for this server")
    assert is_overload(busy) and POLICY.delay(busy, 0, rng) is not None
    limit = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
    assert POLICY.delay(limit, 3, rng) is not None
    too_big = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (5000000 vs. 4194304)")
    assert POLICY.delay(too_big, 0, rng) is None  # the same message will be too big again
    full = _Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "the federation has 10 clients, auth.max_clients allows 10")
    assert POLICY.delay(full, 0, rng) is None
    for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
        assert POLICY.delay(_Refusal(code, "no"), 0, rng) is None


@pytest.fixture
def rate_limited(tmp_path: Path) -> Iterator[LocalFederation]:
    """A real coordinator that allows each client 2 calls per second after a burst of 2."""
    config = parse_config(
        {
            "state_dir": str(tmp_path / "work" / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {"strategy": "fedavg", "rounds": 1, "clients_per_round": 1, "min_clients": 1},
            "data": {"test_data_dir": "builtin"},
            "auth": {"enrollment_tokens": [TOKEN], "client_requests_per_second": 2, "client_burst": 2},
        }
    )
    with LocalFederation(config=config, shards=[], work_dir=tmp_path / "work") as fed:
        fed.start_coordinator()
        yield fed


@pytest.mark.integration
def test_the_edge_client_rides_out_a_rate_limit_on_the_servers_pushback(rate_limited: LocalFederation) -> None:
    conn = FleetConnection(rate_limited.address, call_timeout_s=10, retry=RetryPolicy(give_up_after_s=60), seed=3)
    try:
        conn.join(TOKEN, fleet_pb2.DeviceProfile(platform="retry test"))
        for _ in range(8):  # four times the burst, as fast as the client can: most are refused first
            conn.heartbeat(busy=False)
        assert conn.stats.retries["RESOURCE_EXHAUSTED"] >= 3
        assert set(conn.stats.retries) == {"RESOURCE_EXHAUSTED"}
    finally:
        conn.close()


@pytest.mark.integration
def test_a_refusal_retrying_cannot_fix_surfaces_at_once(rate_limited: LocalFederation) -> None:
    conn = FleetConnection(rate_limited.address, call_timeout_s=10, seed=4)
    try:
        with pytest.raises(FleetCallError) as err:
            conn.join("not-the-enrollment-token", fleet_pb2.DeviceProfile(platform="retry test"))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert not conn.stats.retries
    finally:
        conn.close()
