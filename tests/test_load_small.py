"""The load benchmark, small: 100 protocol-level clients (no torch), cohort 20, 2 rounds, one real coordinator.

Runs `benchmarks/load.py`'s main() as CI would, results into tmp_path; checks what must hold at any
size (every acknowledged update is in the ledger, nothing refused, every round committed, every
client finished) and never how long anything took.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import load  # noqa: E402

pytestmark = pytest.mark.integration


def test_load_small(tmp_path: Path) -> None:
    results = tmp_path / "results"
    code = load.main(
        [
            "--clients",
            "100",
            "--cohort",
            "20",
            "--rounds",
            "2",
            "--workers",
            "2",
            "--ramp",
            "1",
            "--train-seconds",
            "0.2",
            "--poll-wait-ms",
            "5000",
            "--timeout",
            "400",
            "--out",
            str(tmp_path / "work"),
            "--results-dir",
            str(results),
        ]
    )
    doc = json.loads((results / "load.json").read_text())
    assert (results / "load.csv").stat().st_size > 0 and (results / "load.png").stat().st_size > 0

    assert doc["lost_updates"] == 0, doc["lost_update_keys"]
    assert doc["rejected_updates"] == 0 and doc["ledger_rejected"] == 0, doc["client_problems"]
    assert doc["rounds_committed"] == 2
    assert (doc["clients"], doc["cohort"], doc["rounds"]) == (100, 20, 2)
    # Every sampled client delivered: the ledger and the acks agree one for one.
    assert doc["accepted_updates"] == doc["ledger_completed"] == 2 * 20
    assert doc["completed_without_ack"] == 0 and doc["num_examples_mismatch"] == 0
    assert doc["client_outcomes"] == {"done": 100}, doc["client_problems"]
    assert doc["torch_imported_by_clients"] is False
    assert doc["channels_total"] == 100  # one channel per client by default
    for rpc in ("Join", "PollTask", "DownloadArtifact", "UploadUpdate", "Heartbeat"):
        entry = doc["rpcs"][rpc]
        assert entry["count"] > 0 and entry["errors"] == 0, (rpc, entry)
        assert 0 <= entry["p50_ms"] <= entry["p99_ms"], (rpc, entry)
    assert doc["rpcs"]["Join"]["count"] == 100 and doc["rpcs"]["UploadUpdate"]["count"] == 40
    assert doc["peak_rss_mib"] > 0 and len(doc["rss_timeline"]) >= 1
    assert {r["measure"] for r in doc["rows"]} >= {"Join", "PollTask", "DownloadArtifact", "UploadUpdate", "Heartbeat"}
    assert code == 0
