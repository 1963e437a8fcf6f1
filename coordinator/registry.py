"""Who is in the federation: enrollment, credentials, liveness and whether each client may be sampled.

A client joins with an enrollment token and gets a credential (``<client id>.<secret>``) that
every later call carries; only its sha256 is kept, in memory and in the store. A client is alive
while it holds a long poll or has called recently, and eligible when it is alive, ready by its own
probes, and has not declined this kind of task for memory.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedgen.coordinator import errors
from fedgen.coordinator.config import AuthConfig
from fedgen.coordinator.events import now_ms
from fedgen.coordinator.records import ClientProfile, StoredClient
from fedgen.coordinator.store import StateStore, is_digest
from fedgen.core.task import TaskIdentity

_LOGGER = logging.getLogger(__name__)

_CLIENT_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_CLIENT_ID = 64
#: Global models a client may say it holds (PollTaskRequest.held_models).
MAX_HELD_MODELS = 4
#: Joins refused for another task, kept until the next round's ledger row lists them.
MAX_REFUSED_JOINS = 256


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ClientRecord:
    client_id: str
    credential_sha256: str
    profile: ClientProfile
    issued_ms: int  # wall clock when the credential was issued (it survives restarts)
    last_seen: float = 0.0  # time.monotonic() of the last authenticated call
    left: bool = False
    polls: int = 0  # long polls in flight
    # The device's own probes: not willing to train now, and why (DeviceState).
    not_ready: str | None = None
    # Kinds of task the client turned down for memory: task kind -> reason.
    declined_kinds: dict[str, str] = field(default_factory=dict)
    # Global-model artifacts the client says it holds decoded, newest first.
    held_models: tuple[str, ...] = ()
    # Set when the device behind this id later joined with another task: never sampled again.
    wrong_task: str | None = None


class ClientRegistry:
    def __init__(
        self, store: StateStore, auth: AuthConfig, heartbeat_timeout_s: float, task: TaskIdentity | None = None
    ) -> None:
        self._store = store
        self._auth = auth
        self._enrollment_hashes = auth.enrollment_hashes()
        self._heartbeat_timeout_s = heartbeat_timeout_s
        self._task = task
        self._clients: dict[str, ClientRecord] = {}
        self._refused: OrderedDict[str, str] = OrderedDict()

    def load(self, stored: Iterable[StoredClient]) -> None:
        for c in stored:
            self._clients[c.client_id] = ClientRecord(
                c.client_id, c.credential_sha256, c.profile, c.issued_ms, left=c.left_ms is not None
            )

    def __getitem__(self, client_id: str) -> ClientRecord:
        return self._clients[client_id]

    # ------------------------------------------------------------ credentials
    async def join(
        self,
        enrollment_token: str,
        profile: ClientProfile,
        requested_id: str,
        task: TaskIdentity | None = None,
        peer: str = "",
    ) -> tuple[str, str]:
        """Exchanges an enrollment token for (client_id, credential); durable before it returns.

        A client that declares another task than the coordinator's is refused (FAILED_PRECONDITION)."""
        token_hash = _sha256(enrollment_token)
        if not any(hmac.compare_digest(token_hash, h) for h in self._enrollment_hashes):
            raise errors.Unauthenticated("enrollment token is not valid")
        if task is not None and self._task is not None and task != self._task:
            self._refuse(requested_id, peer, task, self._task)
        if requested_id:
            if len(requested_id) > MAX_CLIENT_ID or not set(requested_id) <= _CLIENT_ID_CHARS:
                raise errors.InvalidArgument(
                    f"requested_client_id must be 1-{MAX_CLIENT_ID} characters of letters, digits, '-', '_' or '.'"
                )
            client_id = requested_id
        else:
            client_id = f"client-{uuid.uuid4().hex[:10]}"
        credential = f"{client_id}.{secrets.token_urlsafe(24)}"
        record = ClientRecord(client_id, _sha256(credential), profile, now_ms(), last_seen=time.monotonic())
        await self._store.upsert_client(StoredClient(client_id, record.credential_sha256, profile, record.issued_ms))
        previous = self._clients.get(client_id)
        # Same budget, same limits: a memory decline stands until the device declares more memory.
        if previous is not None and previous.profile.memory_budget_mb == profile.memory_budget_mb:
            record.declined_kinds = previous.declined_kinds
        self._clients[client_id] = record
        _LOGGER.info("[Fleet.Join] %s joined (%s)", client_id, profile.platform or "?")
        return client_id, credential

    def _refuse(self, requested_id: str, peer: str, theirs: TaskIdentity, mine: TaskIdentity) -> None:
        if theirs.name != mine.name or theirs.version != mine.version:
            why = f"task {theirs.name} {theirs.version}, this coordinator trains {mine.name} {mine.version}"
        else:  # same name and version, other tensors: one side changed the model without a new version
            why = (
                f"task {theirs.name} {theirs.version} with state spec {theirs.state_spec_sha256[:12]}, this "
                f"coordinator's has {mine.state_spec_sha256[:12]} (the model differs: bump the task's version)"
            )
        who = requested_id or f"(join from {peer or 'an unknown peer'})"
        self._refused[who] = f"refused at join: {why}"
        self._refused.move_to_end(who)
        while len(self._refused) > MAX_REFUSED_JOINS:
            self._refused.popitem(last=False)
        previous = self._clients.get(requested_id)
        if previous is not None:
            previous.wrong_task = why
        _LOGGER.warning("[Fleet.Join] %s refused: %s", who, why)
        raise errors.FailedPrecondition(f"client runs {why}; run task {mine.name} {mine.version} on this device")

    def take_refused(self) -> dict[str, str]:
        """Joins refused for another task since the last call (the next ledger row lists them)."""
        refused = dict(self._refused)
        self._refused.clear()
        return refused

    def authenticate(self, credential: str | None) -> str:
        """The client id a credential belongs to; UNAUTHENTICATED otherwise."""
        if not credential:
            raise errors.Unauthenticated("missing credential: send 'authorization: Bearer <credential>' metadata")
        client_id = credential.rsplit(".", 1)[0]  # the secret has no '.'; a client id may
        record = self._clients.get(client_id)
        if record is None or not hmac.compare_digest(record.credential_sha256, _sha256(credential)):
            raise errors.Unauthenticated("unknown client or bad credential")
        if record.left:
            raise errors.Unauthenticated(f"client {client_id} has left the federation; join again")
        if self._expired(record):
            raise errors.Unauthenticated(
                f"credential of {client_id} expired (older than {self._auth.credential_ttl_s:g} s); join again"
            )
        record.last_seen = time.monotonic()
        return client_id

    async def leave(self, client_id: str) -> None:
        self._clients[client_id].left = True
        await self._store.mark_left(client_id, now_ms())

    def _expired(self, record: ClientRecord) -> bool:
        ttl_s = self._auth.credential_ttl_s
        return ttl_s > 0 and now_ms() - record.issued_ms > ttl_s * 1000

    # ----------------------------------------------------------------- state
    def set_readiness(self, client_id: str, not_ready: bool, reason: str) -> bool:
        """The device's probes said whether it is willing to train; True when that changed."""
        record = self._clients[client_id]
        before = record.not_ready
        record.not_ready = (reason or "no reason given")[:200] if not_ready else None
        if before != record.not_ready:
            _LOGGER.info("[Fleet] %s is %s", client_id, f"not ready ({record.not_ready})" if not_ready else "ready")
        return before != record.not_ready

    def set_held_models(self, client_id: str, held: Iterable[str]) -> None:
        models = tuple(h.lower() for h in held)[:MAX_HELD_MODELS]
        if not all(is_digest(h) for h in models):
            raise errors.InvalidArgument("held_models must be sha256 artifact ids (64 hex digits)")
        self._clients[client_id].held_models = models

    def decline_kind(self, client_id: str, task_kind: str, detail: str) -> None:
        """A memory decline: the client is not sampled for this kind of task again (until it re-joins
        with another budget)."""
        self._clients[client_id].declined_kinds[task_kind] = detail

    def begin_poll(self, client_id: str) -> None:
        record = self._clients[client_id]
        record.polls += 1
        record.last_seen = time.monotonic()

    def end_poll(self, client_id: str) -> None:
        record = self._clients[client_id]
        record.polls -= 1
        record.last_seen = time.monotonic()

    # ----------------------------------------------------------- eligibility
    def _alive(self, c: ClientRecord) -> bool:
        horizon = time.monotonic() - self._heartbeat_timeout_s
        return not c.left and not self._expired(c) and (c.polls > 0 or c.last_seen >= horizon)

    @staticmethod
    def _unfit(c: ClientRecord, task_kind: str) -> str | None:
        """Why a connected client may not be sampled now (its own conditions or a memory decline)."""
        if c.wrong_task is not None:
            return f"joined again with {c.wrong_task}"
        if c.not_ready is not None:
            return f"not ready: {c.not_ready}"
        declined = c.declined_kinds.get(task_kind)
        return f"declined this kind of task: {declined}" if declined is not None else None

    def connected(self) -> int:
        return sum(self._alive(c) for c in self._clients.values())

    def eligible(self, task_kind: str) -> list[str]:
        """Clients that are alive (inside a long poll now, or seen recently), ready and not declined."""
        return sorted(
            c.client_id for c in self._clients.values() if self._alive(c) and self._unfit(c, task_kind) is None
        )

    def skipped(self, task_kind: str) -> dict[str, str]:
        """Connected clients that are not eligible, with the reason the ledger records."""
        out = {}
        for c in self._clients.values():
            reason = self._unfit(c, task_kind) if self._alive(c) else None
            if reason is not None:
                out[c.client_id] = reason
        return out
