"""The SQLite state backend: group commits that answer each caller for its own write, durability
across a reopen, and clear errors for a database it cannot use."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from fedgen.coordinator.ledger import LedgerRow
from fedgen.coordinator.records import ArtifactRecord, ClientProfile, RoundRecord, StoredClient, UpdateRecord
from fedgen.coordinator.sqlite_store import SCHEMA_VERSION, SqliteStateStore, StoreError


def _update(i: int, client: str | None = None, key: str | None = None) -> UpdateRecord:
    return UpdateRecord(
        key or f"k{i}", 0, 0, client or f"c{i}", f"t{i}", "a" * 64, 10, (5, 5), {"loss": 0.5}, 0.1, 99, i
    )


def _row(round_: int) -> LedgerRow:
    return LedgerRow(round_, 0, "fedavg", 1, 1, 0, 0, 0, 10, 20, 0.1, 0.2, 0.3, 0.6, 0.9, 0.4, 1, 2, "fixed", 0.0)


def test_concurrent_writes_commit_together_and_a_bad_one_fails_alone(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await SqliteStateStore.open(tmp_path / "s.sqlite3")
        writes = [store.add_update(_update(i)) for i in range(200)]
        writes.append(store.add_update(_update(900, key="k7")))  # a second update with k7's idempotency key
        writes.append(store.add_update(_update(901, client="c8")))  # c8 delivered already in this attempt
        results = await asyncio.gather(*writes, return_exceptions=True)
        assert results[:200] == [None] * 200
        assert all(isinstance(r, sqlite3.IntegrityError) for r in results[200:])
        stored = await store.updates_for(0, 0)
        assert len(stored) == 200 and {u.client_id for u in stored} == {f"c{i}" for i in range(200)}
        assert (await store.find_update("k7")) == _update(7)
        await store.close()

    asyncio.run(scenario())


def test_everything_written_is_there_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    artifacts = (ArtifactRecord("generator_onnx", "c" * 64, 123),)
    client = StoredClient("dev.1", "d" * 64, ClientProfile(memory_budget_mb=384, platform="linux-aarch64"), 5)

    async def write() -> None:
        store = await SqliteStateStore.open(path)
        await store.set_meta({"federation_id": "f1", "current_round": "0"})
        await store.upsert_client(client)
        await store.open_round(RoundRecord(0, 0, "open", {"dev.1": "task"}, "e" * 64, 1, 2, artifacts))
        await store.add_update(_update(1, client="dev.1"))
        await store.close()

    async def read() -> None:
        store = await SqliteStateStore.open(path)
        assert await store.get_meta("federation_id") == "f1"
        assert await store.clients() == [client]
        (r,) = await store.open_rounds()
        assert r.artifacts == artifacts and r.cohort == {"dev.1": "task"}
        assert await store.max_attempt(0) == 0 and await store.max_attempt(1) == -1
        await store.commit_round(0, 0, _row(0), {"current_round": "1"})
        assert await store.open_rounds() == []
        assert await store.ledger() == [_row(0)]
        assert await store.get_meta("current_round") == "1"
        await store.mark_left("dev.1", 77)
        assert (await store.clients())[0].left_ms == 77
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await store.get_meta("federation_id")

    asyncio.run(write())
    asyncio.run(read())


def test_a_database_from_a_newer_coordinator_or_not_a_database_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    db = sqlite3.connect(newer)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match=f"schema {SCHEMA_VERSION + 1}; this coordinator knows up to {SCHEMA_VERSION}"):
        asyncio.run(SqliteStateStore.open(newer))
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(StoreError, match="is not a usable SQLite database"):
        asyncio.run(SqliteStateStore.open(junk))
