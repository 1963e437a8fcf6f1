"""The coordinator's durable state behind two interfaces: records (``StateStore``) and blobs
(``BlobStore``). SQLite plus files (``sqlite_store``, ``file_blobs``) are the embedded default;
a server-grade backend implements the same two classes.

Invariant, whatever the backend: anything acknowledged to a client is durable first. Blobs
(models, updates, artifacts) are content-addressed and written before the record that names them.
``StateStore`` is asynchronous: the round engine awaits it on the event loop and an implementation
does its blocking I/O elsewhere. ``BlobStore`` is blocking: callers run it in worker threads.
"""

from __future__ import annotations

import errno
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping

from fedgen.coordinator.ledger import LedgerRow
from fedgen.coordinator.records import RoundRecord, StoredClient, UpdateRecord

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_digest(digest: str) -> bool:
    """Only 64 lowercase hex digits name a blob: anything else could walk out of the store."""
    return _SHA256_HEX.fullmatch(digest) is not None


def is_disk_full(err: BaseException) -> bool:
    """A write failed because the state folder's disk (or the user's quota) is full: transient, the
    coordinator pauses and retries and clients are told RESOURCE_EXHAUSTED with a time to retry."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


class BlobCorrupt(OSError):
    """A blob's bytes no longer match its digest."""


class BlobStore(ABC):
    """Content-addressed, create-only blobs, verified on every read (blocking calls)."""

    @abstractmethod
    def put(self, data: bytes) -> str:
        """Stores ``data`` durably (a no-op when it is already there); returns its sha256."""

    @abstractmethod
    def get(self, digest: str) -> bytes:
        """The blob's bytes; ``BlobCorrupt`` when they fail the digest, FileNotFoundError when absent."""

    @abstractmethod
    def has(self, digest: str) -> bool: ...

    @abstractmethod
    def delete(self, digest: str) -> bool:
        """Removes a blob (retention); False when it was not there."""

    @abstractmethod
    def quarantine(self, digest: str) -> str | None:
        """Moves an unreadable blob aside (kept for an operator to inspect, never served or read
        again); returns where it went, None when there was nothing to move."""


class StateStore(ABC):
    """Clients, rounds, accepted updates, the ledger and a few named values of one federation."""

    # ----------------------------------------------------------------- meta
    @abstractmethod
    async def get_meta(self, key: str) -> str | None: ...

    @abstractmethod
    async def set_meta(self, values: Mapping[str, str]) -> None: ...

    # -------------------------------------------------------------- clients
    @abstractmethod
    async def upsert_client(self, client: StoredClient) -> None:
        """A join: the client's (new) credential hash and profile; clears an earlier leave."""

    @abstractmethod
    async def mark_left(self, client_id: str, now_ms: int) -> None: ...

    @abstractmethod
    async def clients(self) -> list[StoredClient]: ...

    # --------------------------------------------------------------- rounds
    @abstractmethod
    async def open_round(self, record: RoundRecord) -> None: ...

    @abstractmethod
    async def set_round_deadline(self, round_: int, attempt: int, deadline_ms: int) -> None: ...

    @abstractmethod
    async def fail_round(self, round_: int, attempt: int) -> None: ...

    @abstractmethod
    async def open_rounds(self) -> list[RoundRecord]:
        """Rounds a crash left open, oldest first."""

    @abstractmethod
    async def round_record(self, round_: int, attempt: int) -> RoundRecord | None:
        """One attempt at a round as it was recorded (open, committed or failed), or None."""

    @abstractmethod
    async def max_attempt(self, round_: int) -> int:
        """The highest attempt of ``round_`` so far, -1 when it never opened."""

    @abstractmethod
    async def commit_round(self, round_: int, attempt: int, row: LedgerRow, meta: Mapping[str, str]) -> None:
        """One transaction: the round is committed, its ledger row written and the meta values set."""

    # -------------------------------------------------------------- updates
    @abstractmethod
    async def add_update(self, update: UpdateRecord) -> None:
        """Durable when it returns; a second update with the same idempotency key, or of the same
        client for the same round attempt, is an error and changes nothing."""

    @abstractmethod
    async def find_update(self, idempotency_key: str) -> UpdateRecord | None: ...

    @abstractmethod
    async def updates_for(self, round_: int, attempt: int) -> list[UpdateRecord]: ...

    # --------------------------------------------------------------- ledger
    @abstractmethod
    async def ledger(self, from_round: int = 0) -> list[LedgerRow]: ...

    @abstractmethod
    async def close(self) -> None: ...
