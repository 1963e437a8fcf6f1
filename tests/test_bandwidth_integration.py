"""Encodings chosen per client over the real wire, and transfers cut for real.

A coordinator process and edge-client processes on real MNIST. Clients reach the coordinator
through ``tools.netem`` proxies: real TCP connections that are shaped, counted or cut.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from tools.netem import Cut, Shape, TcpProxy

pytestmark = pytest.mark.integration

TOKEN = "bandwidth-enrollment-token"


def _config(work: Path, mnist_dir: Path, strategy: str, rounds: int, clients: int, **bandwidth: object):
    return parse_config(
        {
            "state_dir": str(work / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": strategy,
                "rounds": rounds,
                "clients_per_round": clients,
                "min_clients": clients,
                "min_completed": clients,
                "round_timeout_s": 60,
                "seed": 5,
            },
            "training": {"local_steps": 10, "learning_rate": 0.05},
            "fedgen": {"generator_steps": 5},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN]},
            "bandwidth": bandwidth,
        }
    )


def _shards(mnist_dir: Path, work: Path, n: int) -> list[Path]:
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, work / "shards", n_clients=n, alpha=1.0, seed=2, samples_per_class=150)
    return shards


def _run(fed: LocalFederation, timeout_s: float = 150) -> list:
    fed.start_clients(TOKEN)
    for event in fed.events(timeout_s):
        if event.kind == event.KIND_FEDERATION_FINISHED:
            break
    assert fed.wait_clients(60) == [0] * len(fed.shards), "every client exits cleanly"
    return fed.ledger()


def test_adaptive_policy_gives_a_slow_link_compact_encodings(mnist_dir: Path, tmp_path: Path) -> None:
    """Client 0 sits behind a real 0.4 Mbit/s link and says so; client 1 is on loopback. With a
    2 s budget the slow client must get compact encodings (a delta upload through error
    feedback), the fast one the exact ones, and every update must still count."""
    shards = _shards(mnist_dir, tmp_path, 2)
    config = _config(tmp_path, mnist_dir, "fedgen", rounds=3, clients=2, policy="adaptive", transfer_budget_s=2.0)
    with LocalFederation(
        config, shards, tmp_path, per_client_args={0: ["--link-down-mbps", "0.4", "--link-up-mbps", "0.4"]}
    ) as fed:
        port = fed.start_coordinator()
        with TcpProxy(("127.0.0.1", port), down=Shape(0.4e6, 0.02), up=Shape(0.4e6, 0.02)) as slow:
            fed.per_client_address[0] = slow.address
            rows = _run(fed)
    assert [r.completed for r in rows] == [2, 2, 2]
    slow_id, fast_id = shards[0].stem, shards[1].stem
    for row in rows:
        assert row.encoding_policy == "adaptive" and row.transfer_budget_seconds == 2.0
        entries = {c.client_id: c for c in row.clients}
        slow_c, fast_c = entries[slow_id], entries[fast_id]
        assert fast_c.model_encoding == "fp32+zstd" and fast_c.upload_encoding == "fp32"
        assert slow_c.model_encoding in ("fp16+zstd", "int8+zstd", "delta-int8+zstd")
        assert slow_c.upload_encoding != "fp32"
        assert slow_c.expected_transfer_seconds <= 2.0
        assert slow_c.bytes_down < 0.6 * fast_c.bytes_down
        assert slow_c.bytes_up < 0.5 * fast_c.bytes_up
        assert slow_c.down_seconds > 0 and slow_c.up_seconds > 0
        assert slow_c.estimated_down_bps < 2e6 < fast_c.estimated_down_bps
        if row.round > 0:  # from round 1 a generator ships, in the encoding the link affords
            assert fast_c.generator_encoding == "fp32+zstd"
            assert slow_c.generator_encoding in ("fp16+zstd", "int8+zstd", "int4+zstd")
        assert math.isfinite(row.test_accuracy)
    # The slow client's deltas (lossy, sparse) did not wreck the model (garbage deltas give ~10%);
    # their exact reconstruction is tests/test_transfers.py's.
    assert rows[-1].test_accuracy > 0.2, [r.test_accuracy for r in rows]


def _one_client_behind(cut: Cut, mnist_dir: Path, tmp_path: Path) -> tuple[list, TcpProxy, str]:
    """Two fp32 FedAvg rounds of one client whose connection the proxy cuts once; the ledger,
    the proxy (with its counts) and the client's log."""
    shards = _shards(mnist_dir, tmp_path, 1)
    config = _config(tmp_path, mnist_dir, "fedavg", rounds=2, clients=1, policy="fixed")
    with LocalFederation(config, shards, tmp_path, client_log_level="INFO") as fed:
        port = fed.start_coordinator()
        with TcpProxy(("127.0.0.1", port), cut=cut) as proxy:
            fed.per_client_address[0] = proxy.address
            rows = _run(fed)
    assert proxy.cuts_done == 1 and proxy.connections >= 2
    assert [r.completed for r in rows] == [1, 1]
    return rows, proxy, (tmp_path / f"{shards[0].stem}.log").read_text()


def test_download_cut_mid_stream_resumes_from_its_offset(mnist_dir: Path, tmp_path: Path) -> None:
    """The first connection is reset after 100 KB towards the client, inside the second 64 KB
    chunk of the ~107 KB model. The client keeps the whole chunk it has, reconnects and fetches
    only the rest."""
    rows, proxy, log = _one_client_behind(Cut("down", 100_000), mnist_dir, tmp_path)
    assert "resuming" in log, log[-2000:]
    model_bytes = rows[1].clients[0].bytes_down  # an uncut round: model plus task
    # Resumed: two models plus the ~36 KB of the chunk that was cut. Restarted from byte 0 it
    # would be two models plus the 100 KB sent before the cut.
    assert proxy.bytes_down < 2 * model_bytes + 50_000, (proxy.bytes_down, model_bytes)


def test_upload_cut_mid_stream_is_retried_and_counted_once(mnist_dir: Path, tmp_path: Path) -> None:
    """The first connection is reset after 60 KB towards the coordinator, in the middle of the
    ~107 KB upload. The client retries with the same idempotency key; the coordinator counts
    one update and one upload's bytes."""
    rows, proxy, log = _one_client_behind(Cut("up", 60_000), mnist_dir, tmp_path)
    assert "UploadUpdate" in log and "retrying" in log, log[-2000:]
    cut_round, clean_round = rows[0].clients[0], rows[1].clients[0]
    assert cut_round.outcome == "completed"
    # One upload counted, not the lost part plus the retry.
    assert abs(cut_round.bytes_up - clean_round.bytes_up) < 1024, (cut_round.bytes_up, clean_round.bytes_up)
    assert proxy.bytes_up > cut_round.bytes_up + clean_round.bytes_up + 50_000  # the wire did carry it twice


def test_the_global_model_travels_as_a_delta_against_the_one_a_client_holds(mnist_dir: Path, tmp_path: Path) -> None:
    """Round 0 nobody holds a model: int8+zstd. From round 1 each client says which model it holds
    and gets the difference against it (its exactness is tests/test_transfers.py's)."""
    shards = _shards(mnist_dir, tmp_path, 2)
    config = _config(
        tmp_path,
        mnist_dir,
        "fedavg",
        rounds=3,
        clients=2,
        policy="fixed",
        model_encoding="delta-int8+zstd",
        upload_encoding="int8+zstd",
    )
    with LocalFederation(config, shards, tmp_path) as fed:
        fed.start_coordinator()
        rows = _run(fed)
    assert [r.completed for r in rows] == [2, 2, 2]
    assert {c.model_encoding for c in rows[0].clients} == {"int8+zstd"}
    for row in rows[1:]:
        assert {c.model_encoding for c in row.clients} == {"delta-int8+zstd"}
        # int8 codes of a difference: about the bytes of the plain int8 model, no more.
        assert all(c.bytes_down < 1.1 * max(c0.bytes_down for c0 in rows[0].clients) for c in row.clients)
    assert rows[-1].test_accuracy > 0.2, [r.test_accuracy for r in rows]
