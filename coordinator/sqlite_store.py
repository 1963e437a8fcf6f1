"""The embedded state backend: SQLite in WAL mode with ``synchronous=FULL``, off the event loop.

One writer thread owns the write connection and commits in groups: every write waiting when it
starts a transaction goes into that transaction, each inside its own savepoint (one that fails is
rolled back alone and its caller gets the error), then one COMMIT, one fsync, and every caller is
answered only after it. Under load N concurrent acknowledgements cost one fsync instead of N, and
a caller is never acknowledged before its own record is durable. Reads run on a second thread
with their own connection (WAL lets them proceed while the writer syncs).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fedgen.coordinator.ledger import LedgerRow
from fedgen.coordinator.records import ArtifactRecord, ClientProfile, RoundRecord, StoredClient, UpdateRecord
from fedgen.coordinator.store import StateStore

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
Statement = tuple[str, tuple[Any, ...]]

#: The schema this code writes (``PRAGMA user_version``); a database from a newer one is refused.
SCHEMA_VERSION = 1
#: Most writes one transaction takes (a bound on how long the first of them waits).
MAX_GROUP = 512

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    credential_sha256 TEXT NOT NULL,
    profile_json TEXT NOT NULL,
    joined_ms INTEGER NOT NULL,       -- when the credential was issued
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
    artifacts_json TEXT NOT NULL,     -- [{"kind", "sha256", "size"}]: the strategy's artifacts (e.g. the generator)
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


def _disk_full_as_os_error(err: BaseException, path: Path) -> BaseException:
    """SQLite's "database or disk is full" as the OSError(ENOSPC) every other write raises, so the
    coordinator answers one kind of full disk in one way (`store.is_disk_full`)."""
    if isinstance(err, sqlite3.Error) and getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return OSError(errno.ENOSPC, f"database or disk is full ({err})", str(path))
    return err


class StoreError(RuntimeError):
    """The state database cannot be used (a newer schema, or not a database at all)."""


@dataclass
class _Write:
    statements: Sequence[Statement]
    done: Future[None] = field(default_factory=Future)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class SqliteStateStore(StateStore):
    """Use ``await SqliteStateStore.open(path)``; ``close()`` when done."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._writes: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="sqlite-writer", daemon=True)
        self._local = threading.local()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-reader")
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> SqliteStateStore:
        store = cls(path)
        await asyncio.to_thread(store._create_schema)
        store._writer.start()
        return store

    def _create_schema(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = _connect(self.path)
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} is not a usable SQLite database: {err}") from None
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} holds state schema {version}; this coordinator knows up to "
                    f"{SCHEMA_VERSION} (upgrade the coordinator)"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as err:
            raise StoreError(f"{self.path} is not a usable SQLite database: {err}") from None
        finally:
            db.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writes.put(None)
        await asyncio.to_thread(self._writer.join)
        self._reader.submit(self._close_reader).result()
        self._reader.shutdown(wait=True)

    # ------------------------------------------------------------ plumbing
    async def _write(self, statements: Sequence[Statement]) -> None:
        if self._closed:
            raise StoreError("the state store is closed")
        write = _Write(statements)
        self._writes.put(write)
        await asyncio.wrap_future(write.done)

    def _write_loop(self) -> None:
        db = _connect(self.path)
        try:
            while True:
                first = self._writes.get()
                if first is None:
                    return
                group, stop = [first], False
                while len(group) < MAX_GROUP:
                    try:
                        nxt = self._writes.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        stop = True
                        break
                    group.append(nxt)
                self._commit_group(db, group, self.path)
                if stop:
                    return
        finally:
            db.close()

    @staticmethod
    def _commit_group(db: sqlite3.Connection, group: list[_Write], path: Path) -> None:
        failures: dict[int, BaseException] = {}
        try:
            db.execute("BEGIN IMMEDIATE")
            for i, write in enumerate(group):
                db.execute(f"SAVEPOINT w{i}")
                try:
                    for sql, args in write.statements:
                        db.execute(sql, args)
                except sqlite3.Error as err:
                    db.execute(f"ROLLBACK TO w{i}")
                    failures[i] = _disk_full_as_os_error(err, path)
                db.execute(f"RELEASE w{i}")
            db.execute("COMMIT")
        except BaseException as err:  # the transaction itself failed (disk full, I/O error): nobody is durable
            if db.in_transaction:
                db.execute("ROLLBACK")
            failed = _disk_full_as_os_error(err, path)
            for write in group:
                write.done.set_exception(failed)
            return
        for i, write in enumerate(group):
            if i in failures:
                write.done.set_exception(failures[i])
            else:
                write.done.set_result(None)

    def _reader_db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = _connect(self.path)
        return db

    def _close_reader(self) -> None:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None:
            db.close()

    async def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self._closed:
            raise StoreError("the state store is closed")
        return await asyncio.wrap_future(self._reader.submit(lambda: self._reader_db().execute(sql, args).fetchall()))

    # ----------------------------------------------------------------- meta
    async def get_meta(self, key: str) -> str | None:
        rows = await self._query("SELECT value FROM meta WHERE key=?", (key,))
        return str(rows[0][0]) if rows else None

    async def set_meta(self, values: Mapping[str, str]) -> None:
        await self._write([_set_meta(k, v) for k, v in values.items()])

    # -------------------------------------------------------------- clients
    async def upsert_client(self, client: StoredClient) -> None:
        await self._write(
            [
                (
                    "INSERT INTO clients(client_id, credential_sha256, profile_json, joined_ms) VALUES (?,?,?,?) "
                    "ON CONFLICT(client_id) DO UPDATE SET credential_sha256=excluded.credential_sha256, "
                    "profile_json=excluded.profile_json, joined_ms=excluded.joined_ms, left_ms=NULL",
                    (client.client_id, client.credential_sha256, client.profile.to_json(), client.issued_ms),
                )
            ]
        )

    async def mark_left(self, client_id: str, now_ms: int) -> None:
        await self._write([("UPDATE clients SET left_ms=? WHERE client_id=?", (now_ms, client_id))])

    async def clients(self) -> list[StoredClient]:
        rows = await self._query("SELECT client_id, credential_sha256, profile_json, joined_ms, left_ms FROM clients")
        return [
            StoredClient(cid, cred, ClientProfile.from_json(profile), joined, left)
            for cid, cred, profile, joined, left in rows
        ]

    # --------------------------------------------------------------- rounds
    async def open_round(self, record: RoundRecord) -> None:
        artifacts = [{"kind": a.kind, "sha256": a.sha256, "size": a.size} for a in record.artifacts]
        await self._write(
            [
                (
                    "INSERT OR REPLACE INTO rounds VALUES (?,?,?,?,?,?,?,?)",
                    (
                        record.round,
                        record.attempt,
                        record.status,
                        json.dumps(record.cohort),
                        record.model_sha256,
                        record.opened_ms,
                        record.deadline_ms,
                        json.dumps(artifacts),
                    ),
                )
            ]
        )

    async def set_round_deadline(self, round_: int, attempt: int, deadline_ms: int) -> None:
        await self._write(
            [("UPDATE rounds SET deadline_ms=? WHERE round=? AND attempt=?", (deadline_ms, round_, attempt))]
        )

    async def fail_round(self, round_: int, attempt: int) -> None:
        await self._write([("UPDATE rounds SET status='failed' WHERE round=? AND attempt=?", (round_, attempt))])

    async def open_rounds(self) -> list[RoundRecord]:
        rows = await self._query("SELECT * FROM rounds WHERE status='open' ORDER BY round, attempt")
        return [_round(r) for r in rows]

    async def round_record(self, round_: int, attempt: int) -> RoundRecord | None:
        rows = await self._query("SELECT * FROM rounds WHERE round=? AND attempt=?", (round_, attempt))
        return _round(rows[0]) if rows else None

    async def max_attempt(self, round_: int) -> int:
        rows = await self._query("SELECT MAX(attempt) FROM rounds WHERE round=?", (round_,))
        return -1 if rows[0][0] is None else int(rows[0][0])

    async def commit_round(self, round_: int, attempt: int, row: LedgerRow, meta: Mapping[str, str]) -> None:
        await self._write(
            [
                ("UPDATE rounds SET status='committed' WHERE round=? AND attempt=?", (round_, attempt)),
                ("INSERT OR REPLACE INTO ledger(round, row_json) VALUES (?, ?)", (round_, json.dumps(row.to_dict()))),
                *(_set_meta(k, v) for k, v in meta.items()),
            ]
        )

    # -------------------------------------------------------------- updates
    async def add_update(self, update: UpdateRecord) -> None:
        u = update
        await self._write(
            [
                (
                    "INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        u.idempotency_key,
                        u.round,
                        u.attempt,
                        u.client_id,
                        u.task_id,
                        u.payload_sha256,
                        u.num_examples,
                        json.dumps(list(u.label_counts)),
                        json.dumps(u.metrics),
                        u.train_seconds,
                        u.bytes_up,
                        u.received_ms,
                    ),
                )
            ]
        )

    async def find_update(self, idempotency_key: str) -> UpdateRecord | None:
        rows = await self._query("SELECT * FROM updates WHERE idempotency_key=?", (idempotency_key,))
        return _update(rows[0]) if rows else None

    async def updates_for(self, round_: int, attempt: int) -> list[UpdateRecord]:
        rows = await self._query(
            "SELECT * FROM updates WHERE round=? AND attempt=? ORDER BY received_ms", (round_, attempt)
        )
        return [_update(r) for r in rows]

    # --------------------------------------------------------------- ledger
    async def ledger(self, from_round: int = 0) -> list[LedgerRow]:
        rows = await self._query("SELECT row_json FROM ledger WHERE round>=? ORDER BY round", (from_round,))
        return [LedgerRow.from_dict(json.loads(r[0])) for r in rows]


def _set_meta(key: str, value: str) -> Statement:
    return "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value)


def _round(r: tuple[Any, ...]) -> RoundRecord:
    artifacts = tuple(ArtifactRecord(a["kind"], a["sha256"], int(a["size"])) for a in json.loads(r[7]))
    return RoundRecord(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], artifacts)


def _update(r: tuple[Any, ...]) -> UpdateRecord:
    return UpdateRecord(
        r[0], r[1], r[2], r[3], r[4], r[5], r[6], tuple(json.loads(r[7])), json.loads(r[8]), r[9], r[10], r[11]
    )
