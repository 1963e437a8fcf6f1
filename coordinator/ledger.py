"""The round ledger: one typed row per committed round, built by a pure function from what the
round engine saw, stored with the commit, sent on the wire, and appended to two files.

The store is the source of truth; ``ledger.jsonl`` (one row per line) and ``ledger.csv`` (flat) in
the state directory are written from it: whole when the coordinator starts, then one row appended
after each commit. A crash between a commit and its append is mended at the next start.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from fedgen.coordinator.records import UpdateRecord
from fedgen.core.files import atomic_write

Outcome = Literal["completed", "dropped", "rejected", "declined"]

#: Extras the round engine itself writes (strategies declare theirs: ``Strategy.metric_names``).
ENGINE_EXTRAS = ("client_cpu_seconds_mean", "client_peak_rss_mb_max", "encode_artifacts_seconds", "federated_accuracy")
#: Metrics a client reports that the ledger lifts out into columns of its own.
WIRE_DOWN_SECONDS, WIRE_UP_SECONDS = "wire_down_seconds", "wire_up_seconds"
#: Per-round columns of the CSV, in order; extras follow as ``extra_<name>``.
CSV_COLUMNS = (
    "round",
    "attempt",
    "strategy",
    "cohort_size",
    "completed",
    "dropped",
    "rejected",
    "declined",
    "skipped",
    "bytes_down",
    "bytes_up",
    "wait_seconds",
    "aggregate_seconds",
    "evaluate_seconds",
    "round_seconds",
    "test_accuracy",
    "test_loss",
    "opened_unix_ms",
    "committed_unix_ms",
    "encoding_policy",
    "transfer_budget_seconds",
)


@dataclass(frozen=True)
class ClientTransfer:
    """How one client's transfers travelled this round and what the link policy expected."""

    model_encoding: str = ""
    upload_encoding: str = ""
    artifact_encodings: dict[str, str] = field(default_factory=dict)  # artifact kind -> encoding
    estimated_down_bps: float = 0.0
    estimated_up_bps: float = 0.0
    expected_transfer_seconds: float = 0.0


@dataclass(frozen=True)
class ClientEntry:
    """What one client did in one round (``control.proto`` ClientRoundEntry)."""

    client_id: str
    outcome: Outcome
    reason: str = ""
    bytes_down: int = 0
    bytes_up: int = 0
    num_examples: int = 0
    train_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    transfer: ClientTransfer = field(default_factory=ClientTransfer)
    down_seconds: float = 0.0
    up_seconds: float = 0.0


@dataclass(frozen=True)
class SkippedClient:
    client_id: str
    reason: str


@dataclass(frozen=True)
class LedgerRow:
    """One committed round: what it cost and what it bought (``control.proto`` LedgerRow)."""

    round: int
    attempt: int
    strategy: str
    cohort_size: int
    completed: int
    dropped: int
    rejected: int
    declined: int
    bytes_down: int
    bytes_up: int
    wait_seconds: float
    aggregate_seconds: float
    evaluate_seconds: float
    round_seconds: float
    test_accuracy: float
    test_loss: float
    opened_unix_ms: int
    committed_unix_ms: int
    encoding_policy: str
    transfer_budget_seconds: float
    model_sha256: str = ""
    clients: tuple[ClientEntry, ...] = ()
    skipped: tuple[SkippedClient, ...] = ()
    extras: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``ledger.jsonl``, the store); per-client transfer fields sit flat in each client."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("clients", "skipped", "extras")}
        out["extras"] = dict(self.extras)
        out["skipped"] = [asdict(s) for s in self.skipped]
        out["clients"] = [_client_dict(c) for c in self.clients]
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LedgerRow:
        scalars = {
            f.name: raw[f.name] for f in fields(cls) if f.name in raw and f.name not in ("clients", "skipped", "extras")
        }
        for key in ("test_accuracy", "test_loss"):  # NaN is written as NaN; a JSON null means the same
            scalars[key] = math.nan if scalars.get(key) is None else float(scalars[key])
        return cls(
            **scalars,
            clients=tuple(_client_from_dict(c) for c in raw.get("clients", ())),
            skipped=tuple(SkippedClient(s["client_id"], s["reason"]) for s in raw.get("skipped", ())),
            extras={k: float(v) for k, v in raw.get("extras", {}).items()},
        )

    def csv_values(self, extra_columns: Sequence[str]) -> list[Any]:
        flat = self.to_dict()
        flat["skipped"] = len(self.skipped)  # the CSV counts; the JSON lines say who and why
        return [flat[c] for c in CSV_COLUMNS] + [self.extras.get(k, "") for k in extra_columns]


def _client_dict(c: ClientEntry) -> dict[str, Any]:
    out = {f.name: getattr(c, f.name) for f in fields(c) if f.name != "transfer"}
    out.update(asdict(c.transfer))
    return out


def _client_from_dict(raw: Mapping[str, Any]) -> ClientEntry:
    transfer_keys = {f.name for f in fields(ClientTransfer)}
    transfer = {k: v for k, v in raw.items() if k in transfer_keys}
    if raw.get("generator_encoding") and "artifact_encodings" not in raw:  # rows written before 0.2
        transfer["artifact_encodings"] = {"generator_onnx": raw["generator_encoding"]}
    entry = {k: v for k, v in raw.items() if k in ClientEntry.__dataclass_fields__ and k != "transfer"}
    return ClientEntry(**entry, transfer=ClientTransfer(**transfer))


# ------------------------------------------------------------------------- the builder


@dataclass(frozen=True)
class RoundTally:
    """Everything the round engine knows about a round when it commits it."""

    round: int
    attempt: int
    strategy: str
    cohort: Sequence[str]
    accepted: Mapping[str, UpdateRecord]
    rejected: Mapping[str, str]
    declined: Mapping[str, str]
    skipped: Mapping[str, str]
    bytes_down: Mapping[str, int]
    bytes_up: Mapping[str, int]  # requests other than the update (the update counts its own bytes)
    transfers: Mapping[str, ClientTransfer]
    opened_ms: int
    committed_ms: int
    wait_seconds: float
    aggregate_seconds: float
    evaluate_seconds: float
    test_accuracy: float
    test_loss: float
    strategy_extras: Mapping[str, float]
    encode_seconds: float
    encoding_policy: str
    transfer_budget_seconds: float
    model_sha256: str


def _entry(t: RoundTally, client_id: str) -> ClientEntry:
    u = t.accepted.get(client_id)
    transfer = t.transfers.get(client_id, ClientTransfer())
    down, up = t.bytes_down.get(client_id, 0), t.bytes_up.get(client_id, 0)
    if u is not None:
        metrics = dict(u.metrics)
        return ClientEntry(
            client_id,
            "completed",
            "",
            down,
            up + u.bytes_up,
            u.num_examples,
            u.train_seconds,
            metrics={k: v for k, v in metrics.items() if k not in (WIRE_DOWN_SECONDS, WIRE_UP_SECONDS)},
            transfer=transfer,
            down_seconds=float(metrics.get(WIRE_DOWN_SECONDS, 0.0)),
            up_seconds=float(metrics.get(WIRE_UP_SECONDS, 0.0)),
        )
    if client_id in t.rejected:
        return ClientEntry(client_id, "rejected", t.rejected[client_id], down, up, transfer=transfer)
    if client_id in t.declined:
        return ClientEntry(client_id, "declined", t.declined[client_id], down, up, transfer=transfer)
    return ClientEntry(client_id, "dropped", "no valid update before the round's deadline", down, up, transfer=transfer)


def _measured_extras(clients: Iterable[ClientEntry]) -> dict[str, float]:
    """What the cohort measured itself: the paper's federated accuracy (the round's incoming model on
    the clients' label-restricted local test splits) and what the round cost the devices."""
    clients = list(clients)
    extras: dict[str, float] = {}
    local = [
        (c.metrics["local_test_correct"], c.metrics["local_test_total"])
        for c in clients
        if "local_test_correct" in c.metrics and "local_test_total" in c.metrics
    ]
    total = sum(n for _, n in local)
    if total:
        extras["federated_accuracy"] = sum(k for k, _ in local) / total
    peaks = [c.metrics["peak_rss_mb"] for c in clients if "peak_rss_mb" in c.metrics]
    if peaks:
        extras["client_peak_rss_mb_max"] = round(float(max(peaks)), 3)
    cpus = [c.metrics["cpu_seconds"] for c in clients if "cpu_seconds" in c.metrics]
    if cpus:
        extras["client_cpu_seconds_mean"] = round(float(statistics.fmean(cpus)), 3)
    return extras


def build_ledger_row(t: RoundTally) -> LedgerRow:
    """The round's ledger row (pure: the same tally gives the same row)."""
    clients = tuple(_entry(t, cid) for cid in sorted(t.cohort))
    extras = {**t.strategy_extras, "encode_artifacts_seconds": round(t.encode_seconds, 4), **_measured_extras(clients)}
    outcomes = [c.outcome for c in clients]
    return LedgerRow(
        round=t.round,
        attempt=t.attempt,
        strategy=t.strategy,
        cohort_size=len(clients),
        completed=outcomes.count("completed"),
        dropped=outcomes.count("dropped"),
        rejected=outcomes.count("rejected"),
        declined=outcomes.count("declined"),
        bytes_down=sum(c.bytes_down for c in clients),
        bytes_up=sum(c.bytes_up for c in clients),
        wait_seconds=round(t.wait_seconds, 4),
        aggregate_seconds=round(t.aggregate_seconds, 4),
        evaluate_seconds=round(t.evaluate_seconds, 4),
        round_seconds=round((t.committed_ms - t.opened_ms) / 1000, 4),
        test_accuracy=t.test_accuracy,
        test_loss=t.test_loss,
        opened_unix_ms=t.opened_ms,
        committed_unix_ms=t.committed_ms,
        encoding_policy=t.encoding_policy,
        transfer_budget_seconds=t.transfer_budget_seconds,
        model_sha256=t.model_sha256,
        clients=clients,
        skipped=tuple(SkippedClient(cid, why) for cid, why in sorted(t.skipped.items())),
        extras=extras,
    )


# ---------------------------------------------------------------------------- the files


def rows_to_csv(rows: Sequence[LedgerRow], extra_columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *(f"extra_{k}" for k in extra_columns)])
    writer.writerows(row.csv_values(extra_columns) for row in rows)
    return out.getvalue()


class LedgerFiles:
    """``ledger.jsonl`` and ``ledger.csv``: rewritten whole once (``rewrite``), then appended to.

    The CSV's columns are fixed when it is written: the engine's extras, the strategy's declared
    metrics, and any other extra a stored row has. A row with an extra outside them cannot be
    appended (``append`` returns False) and the caller rewrites the files instead.
    """

    def __init__(self, directory: Path, declared_extras: Iterable[str]) -> None:
        self.jsonl_path = Path(directory) / "ledger.jsonl"
        self.csv_path = Path(directory) / "ledger.csv"
        self.declared = tuple(sorted(set(declared_extras)))
        self.columns = self.declared

    def rewrite(self, rows: Sequence[LedgerRow]) -> None:
        self.columns = tuple(sorted(set(self.declared).union(*(r.extras for r in rows))))
        atomic_write(self.jsonl_path, "".join(_jsonl_line(r) for r in rows).encode())
        atomic_write(self.csv_path, rows_to_csv(rows, self.columns).encode())

    def append(self, row: LedgerRow) -> bool:
        if not set(row.extras) <= set(self.columns) or not self.csv_path.exists():
            return False
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(row.csv_values(self.columns))
        for path, text in ((self.jsonl_path, _jsonl_line(row)), (self.csv_path, buffer.getvalue())):
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        return True


def _jsonl_line(row: LedgerRow) -> str:
    return json.dumps(row.to_dict(), sort_keys=True) + "\n"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``ledger.jsonl`` as plain dicts (for scripts and benchmarks)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
