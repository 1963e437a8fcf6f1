"""The ledger row is a pure function of what the engine saw; one representation in JSON, on the wire, on disk."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedgen.coordinator.ledger import (
    CSV_COLUMNS,
    ClientTransfer,
    LedgerFiles,
    LedgerRow,
    RoundTally,
    build_ledger_row,
    read_jsonl,
)
from fedgen.coordinator.records import UpdateRecord
from fedgen.coordinator.wire import ledger_row_from_proto, ledger_row_to_proto


def _update(client_id: str, **metrics: float) -> UpdateRecord:
    return UpdateRecord(f"{client_id}:k", 3, 1, client_id, "t", "a" * 64, 120, (60, 60), metrics, 0.5, 1_000)


def _tally(**over: object) -> RoundTally:
    base: dict[str, object] = {
        "round": 3,
        "attempt": 1,
        "strategy": "fedgen",
        "cohort": ["d", "c", "b", "a"],
        "accepted": {
            "a": _update(
                "a",
                loss=1.0,
                wire_down_seconds=0.25,
                wire_up_seconds=0.125,
                local_test_correct=8,
                local_test_total=10,
                peak_rss_mb=300.0,
                cpu_seconds=0.5,
            ),
            "b": _update("b", loss=2.0, local_test_correct=2, local_test_total=10, peak_rss_mb=280.0, cpu_seconds=1.5),
        },
        "rejected": {"c": "update tensor 'w' has 1 non-finite value(s) (NaN or Inf)"},
        "declined": {},
        "skipped": {"z": "not ready: on battery", "y": "declined this kind of task: needs 400 MiB"},
        "bytes_down": {"a": 100, "b": 200, "c": 50, "d": 7},
        "bytes_up": {"a": 10, "b": 20, "c": 5000},
        "transfers": {"a": ClientTransfer("int8+zstd", "topk10+zstd", {"generator_onnx": "int8+zstd"}, 1e6, 2e5, 1.5)},
        "opened_ms": 1_000,
        "committed_ms": 3_500,
        "wait_seconds": 2.0,
        "aggregate_seconds": 0.25,
        "evaluate_seconds": 0.125,
        "test_accuracy": 0.9,
        "test_loss": 0.3,
        "strategy_extras": {"generator_loss": 1.25},
        "encode_seconds": 0.0123456,
        "encoding_policy": "adaptive",
        "transfer_budget_seconds": 30.0,
        "model_sha256": "b" * 64,
    }
    base.update(over)
    return RoundTally(**base)  # type: ignore[arg-type]


def test_the_row_counts_every_cohort_member_once_with_its_outcome() -> None:
    row = build_ledger_row(_tally())
    assert [c.client_id for c in row.clients] == ["a", "b", "c", "d"]  # sorted, whatever the cohort order
    assert [c.outcome for c in row.clients] == ["completed", "completed", "rejected", "dropped"]
    assert (row.completed, row.rejected, row.dropped, row.declined, row.cohort_size) == (2, 1, 1, 0, 4)
    assert row.clients[2].reason.startswith("update tensor 'w'")
    assert row.clients[3].reason == "no valid update before the round's deadline"
    assert [(s.client_id, s.reason) for s in row.skipped] == [
        ("y", "declined this kind of task: needs 400 MiB"),
        ("z", "not ready: on battery"),
    ]


def test_bytes_add_the_update_to_the_requests_and_sum_over_the_cohort() -> None:
    row = build_ledger_row(_tally())
    a, b, c, d = row.clients
    assert (a.bytes_down, a.bytes_up) == (100, 10 + 1_000)  # the update's own bytes count once, with it
    assert (b.bytes_down, b.bytes_up) == (200, 20 + 1_000)
    assert (c.bytes_down, c.bytes_up) == (50, 5_000)  # a rejected upload's requests still cost the link
    assert (d.bytes_down, d.bytes_up) == (7, 0)
    assert (row.bytes_down, row.bytes_up) == (357, 1_010 + 1_020 + 5_000)


def test_transfer_times_leave_the_metrics_and_extras_are_measured_from_the_cohort() -> None:
    row = build_ledger_row(_tally())
    a = row.clients[0]
    assert (a.down_seconds, a.up_seconds) == (0.25, 0.125)
    assert "wire_down_seconds" not in a.metrics and a.metrics["loss"] == 1.0
    assert a.transfer.artifact_encodings == {"generator_onnx": "int8+zstd"}
    assert row.clients[1].transfer == ClientTransfer()  # never planned: no encodings to report
    assert row.extras["federated_accuracy"] == pytest.approx(10 / 20)
    assert row.extras["client_peak_rss_mb_max"] == 300.0
    assert row.extras["client_cpu_seconds_mean"] == 1.0
    assert row.extras["encode_artifacts_seconds"] == 0.0123
    assert row.extras["generator_loss"] == 1.25
    assert row.round_seconds == 2.5


def test_extras_the_cohort_did_not_measure_are_absent_not_zero() -> None:
    plain = {"a": _update("a", loss=1.0)}
    row = build_ledger_row(_tally(accepted=plain, strategy_extras={}))
    assert not {"federated_accuracy", "client_peak_rss_mb_max", "client_cpu_seconds_mean"} & set(row.extras)


def test_the_same_tally_gives_the_same_row() -> None:
    assert build_ledger_row(_tally()) == build_ledger_row(_tally())


def test_json_and_wire_forms_give_back_the_same_row() -> None:
    row = build_ledger_row(_tally())
    assert LedgerRow.from_dict(json.loads(json.dumps(row.to_dict()))) == row
    assert ledger_row_from_proto(ledger_row_to_proto(row)) == row
    unevaluated = build_ledger_row(_tally(test_accuracy=math.nan, test_loss=math.nan))
    back = ledger_row_from_proto(ledger_row_to_proto(unevaluated))
    assert math.isnan(back.test_accuracy) and math.isnan(back.test_loss)
    assert ledger_row_to_proto(row).clients[0].generator_encoding == "int8+zstd"  # the field readers had before


def test_rows_written_before_artifact_kinds_still_read() -> None:
    old = build_ledger_row(_tally()).to_dict()
    for client in old["clients"]:
        client["generator_encoding"] = client.pop("artifact_encodings").get("generator_onnx", "")
    assert LedgerRow.from_dict(old).clients[0].transfer.artifact_encodings == {"generator_onnx": "int8+zstd"}


def test_ledger_files_are_rewritten_once_then_appended(tmp_path: Path) -> None:
    files = LedgerFiles(tmp_path, ["generator_loss", "federated_accuracy"])
    first, second = build_ledger_row(_tally(round=0)), build_ledger_row(_tally(round=1))
    files.rewrite([first])
    assert files.append(second)
    assert [r["round"] for r in read_jsonl(files.jsonl_path)] == [0, 1]
    with open(files.csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["round"] for r in table] == ["0", "1"]
    assert list(table[0])[: len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    assert table[1]["skipped"] == "2" and table[1]["extra_generator_loss"] == "1.25"
    # An extra outside the columns cannot be appended: the caller rewrites instead.
    novel = build_ledger_row(_tally(round=2, strategy_extras={"brand_new": 1.0}))
    assert not files.append(novel)
    files.rewrite([first, second, novel])
    with open(files.csv_path, newline="") as f:
        assert "extra_brand_new" in next(csv.reader(f))
