"""The round ledger on disk: JSON lines (one row per committed round) and a flat CSV.

The SQLite store is the source of truth; these files are rewritten from it after every
commit (atomically), so a crash between the commit and the write cannot leave them wrong
for longer than the next commit or restart.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from coordinator.store import atomic_write

#: Per-round columns of the CSV, in order; strategy extras follow as `extra_<name>`.
CSV_COLUMNS = [
    "round", "attempt", "strategy", "cohort_size", "completed", "dropped", "rejected", "declined", "skipped",
    "bytes_down", "bytes_up", "wait_seconds", "aggregate_seconds", "evaluate_seconds",
    "round_seconds", "test_accuracy", "test_loss", "opened_unix_ms", "committed_unix_ms",
    "encoding_policy", "transfer_budget_seconds",
]


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    extra_keys = sorted({k for row in rows for k in row.get("extras", {})})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + [f"extra_{k}" for k in extra_keys])
    for row in rows:
        flat = {**row, "skipped": len(row.get("skipped", ()))}  # the CSV counts; the JSON lines say who and why
        writer.writerow([flat.get(c, "") for c in CSV_COLUMNS] + [row.get("extras", {}).get(k, "") for k in extra_keys])
    return out.getvalue()


class LedgerWriter:
    def __init__(self, state_dir: Path) -> None:
        self.jsonl_path = Path(state_dir) / "ledger.jsonl"
        self.csv_path = Path(state_dir) / "ledger.csv"

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        atomic_write(self.jsonl_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
        atomic_write(self.csv_path, rows_to_csv(rows).encode())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
