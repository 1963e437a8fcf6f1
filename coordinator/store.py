"""Durable coordinator state: SQLite (WAL) for records, content-addressed files for blobs.

Invariant: anything acknowledged to a client is on disk first. Blobs (models, updates)
are written to a temp file, fsynced and renamed before the row that names them commits.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

_LOGGER = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    credential_sha256 TEXT NOT NULL,
    profile_json TEXT NOT NULL,
    joined_ms INTEGER NOT NULL,
    left_ms INTEGER
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    status TEXT NOT NULL,             -- open | committed | failed
    cohort_json TEXT NOT NULL,        -- {client_id: task_id}
    model_sha256 TEXT NOT NULL,       -- global model the round trains from
    opened_ms INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    artifacts_json TEXT NOT NULL,     -- [{"kind", "sha256", "size"}]: extra artifacts (e.g. the generator)
    PRIMARY KEY (round, attempt)
);
CREATE TABLE IF NOT EXISTS updates (
    idempotency_key TEXT PRIMARY KEY,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    label_counts_json TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    train_seconds REAL NOT NULL,
    bytes_up INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    UNIQUE (round, attempt, client_id)
);
CREATE TABLE IF NOT EXISTS ledger (round INTEGER PRIMARY KEY, row_json TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StoredUpdate:
    idempotency_key: str
    round: int
    attempt: int
    client_id: str
    task_id: str
    payload_sha256: str
    num_examples: int
    label_counts: list[int]
    metrics: dict[str, float]
    train_seconds: float
    bytes_up: int
    received_ms: int


@dataclass(frozen=True)
class StoredRound:
    round: int
    attempt: int
    status: str
    cohort: dict[str, str]
    model_sha256: str
    opened_ms: int
    deadline_ms: int
    artifacts: list[dict[str, Any]]


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write-temp, fsync, rename, fsync dir: the file is either whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class BlobStore:
    """Content-addressed files: blobs/<sha256[:2]>/<sha256>. Verified on read."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def is_digest(digest: str) -> bool:
        """Only 64 lowercase hex digits name a blob: anything else could walk out of the store."""
        return _SHA256_HEX.fullmatch(digest) is not None

    def path(self, digest: str) -> Path:
        if not self.is_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        digest = sha256_hex(data)
        path = self.path(digest)
        if not path.exists():
            atomic_write(path, data)
        return digest

    def has(self, digest: str) -> bool:
        return self.is_digest(digest) and self.path(digest).exists()

    def get(self, digest: str) -> bytes:
        data = self.path(digest).read_bytes()
        if sha256_hex(data) != digest:
            raise OSError(f"blob {digest} is corrupt on disk (digest mismatch)")
        return data


class StateStore:
    """SQLite in WAL mode with synchronous=FULL: a committed row survives SIGKILL and power loss."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.state_dir / "blobs")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.state_dir / "state.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0][0] if rows else default

    def set_meta(self, **values: str) -> None:
        self._tx([("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v)) for k, v in values.items()])

    # clients
    def upsert_client(self, client_id: str, credential_sha256: str, profile: dict[str, Any], now_ms: int) -> None:
        self._tx([(
            "INSERT INTO clients(client_id, credential_sha256, profile_json, joined_ms) VALUES (?,?,?,?) "
            "ON CONFLICT(client_id) DO UPDATE SET credential_sha256=excluded.credential_sha256, "
            "profile_json=excluded.profile_json, joined_ms=excluded.joined_ms, left_ms=NULL",
            (client_id, credential_sha256, json.dumps(profile), now_ms),
        )])

    def mark_left(self, client_id: str, now_ms: int) -> None:
        self._tx([("UPDATE clients SET left_ms=? WHERE client_id=?", (now_ms, client_id))])

    def clients(self) -> Iterator[tuple[str, str, dict[str, Any], int | None, int]]:
        """(client_id, credential_sha256, profile, left_ms, joined_ms = when the credential was issued)."""
        for cid, cred, profile, left, joined in self._query(
                "SELECT client_id, credential_sha256, profile_json, left_ms, joined_ms FROM clients"):
            yield cid, cred, json.loads(profile), left, joined

    # rounds
    def open_round(self, r: StoredRound) -> None:
        self._tx([(
            "INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?)",
            (r.round, r.attempt, r.status, json.dumps(r.cohort), r.model_sha256, r.opened_ms, r.deadline_ms,
             json.dumps(r.artifacts)),
        )])

    def set_round_deadline(self, round_: int, attempt: int, deadline_ms: int) -> None:
        self._tx([("UPDATE rounds SET deadline_ms=? WHERE round=? AND attempt=?", (deadline_ms, round_, attempt))])

    def fail_round(self, round_: int, attempt: int) -> None:
        self._tx([("UPDATE rounds SET status='failed' WHERE round=? AND attempt=?", (round_, attempt))])

    def open_rounds(self) -> list[StoredRound]:
        rows = self._query("SELECT * FROM rounds WHERE status='open' ORDER BY round, attempt")
        return [StoredRound(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], json.loads(r[7])) for r in rows]

    def round_artifacts(self, round_: int, attempt: int) -> list[dict[str, Any]]:
        """The extra artifacts (e.g. the generator) a round shipped, as recorded when it opened."""
        rows = self._query("SELECT artifacts_json FROM rounds WHERE round=? AND attempt=?", (round_, attempt))
        return json.loads(rows[0][0]) if rows else []

    def max_attempt(self, round_: int) -> int:
        rows = self._query("SELECT MAX(attempt) FROM rounds WHERE round=?", (round_,))
        return -1 if rows[0][0] is None else int(rows[0][0])

    def commit_round(self, round_: int, attempt: int, ledger_row: dict[str, Any], meta: dict[str, str]) -> None:
        """One transaction: the round is committed, its ledger row written and the federation advanced."""
        statements: list[tuple[str, tuple[Any, ...]]] = [
            ("UPDATE rounds SET status='committed' WHERE round=? AND attempt=?", (round_, attempt)),
            ("INSERT OR REPLACE INTO ledger(round, row_json) VALUES (?, ?)", (round_, json.dumps(ledger_row))),
        ]
        statements += [("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (k, v)) for k, v in meta.items()]
        self._tx(statements)

    # updates
    def add_update(self, u: StoredUpdate) -> None:
        self._tx([(
            "INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (u.idempotency_key, u.round, u.attempt, u.client_id, u.task_id, u.payload_sha256, u.num_examples,
             json.dumps(u.label_counts), json.dumps(u.metrics), u.train_seconds, u.bytes_up, u.received_ms),
        )])

    def find_update(self, idempotency_key: str) -> StoredUpdate | None:
        rows = self._query("SELECT * FROM updates WHERE idempotency_key=?", (idempotency_key,))
        return self._update(rows[0]) if rows else None

    def updates_for(self, round_: int, attempt: int) -> list[StoredUpdate]:
        rows = self._query("SELECT * FROM updates WHERE round=? AND attempt=? ORDER BY received_ms", (round_, attempt))
        return [self._update(r) for r in rows]

    @staticmethod
    def _update(r: tuple[Any, ...]) -> StoredUpdate:
        return StoredUpdate(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), json.loads(r[8]), r[9], r[10], r[11])

    # ledger
    def ledger(self, from_round: int = 0) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._query("SELECT row_json FROM ledger WHERE round>=? ORDER BY round", (from_round,))]
