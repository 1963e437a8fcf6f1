"""Who is in the federation: enrollment, credentials, liveness and whether each client may be sampled.

A client joins with an enrollment token and gets a credential (``<client id>.<secret>``) that
every later call carries; only its sha256 is kept, in memory and in the store. An id stays bound
to its credential: joining again under a known id needs that credential (even expired) as proof,
unless the id left or has been silent past ``auth.release_silent_id_s``. A client is alive while
it holds a long poll or has called recently, and eligible when it is alive, has made a call with
its credential since it joined (an id that only joined is never sampled), is ready by its own
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
from fedgen.coordinator.peer_limits import PeerLimits
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
    # Whether it has made a call with this credential since it was issued (or since a restart).
    proven: bool = False
    # time.monotonic() of the last proof of possession (join, authenticated call, or the restart).
    last_proof: float = field(default_factory=time.monotonic)


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
        self.peers: PeerLimits = auth.peer_limits()
        # Joined, not yet called with the credential: id -> time.monotonic() of the join.
        self._unproven: OrderedDict[str, float] = OrderedDict()
        self._registered = 0  # records that have not left

    def load(self, stored: Iterable[StoredClient]) -> None:
        for c in stored:
            self._clients[c.client_id] = ClientRecord(
                c.client_id, c.credential_sha256, c.profile, c.issued_ms, left=c.left_ms is not None
            )
        self._registered = sum(not c.left for c in self._clients.values())

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
        previous_credential: str = "",
        certified_id: str | None = None,
    ) -> tuple[str, str]:
        """Exchanges an enrollment token for (client_id, credential); durable before it returns.

        A client that declares another task than the coordinator's is refused (FAILED_PRECONDITION);
        a known id without its previous credential is refused (ALREADY_EXISTS). With `certified_id`
        (the id the connection's client certificate names) that is the id, and the certificate,
        not a previous credential, proves a rejoin."""
        self.peers.check_join(peer)
        if certified_id is not None:
            if requested_id and requested_id != certified_id:
                raise errors.PermissionDenied(
                    f"requested_client_id {requested_id!r} is not the id this connection's certificate "
                    f"names ({certified_id!r})"
                )
            requested_id = certified_id
        if requested_id and (len(requested_id) > MAX_CLIENT_ID or not set(requested_id) <= _CLIENT_ID_CHARS):
            raise errors.InvalidArgument(
                f"requested_client_id must be 1-{MAX_CLIENT_ID} characters of letters, digits, '-', '_' or '.'"
            )
        self._check_enrollment(enrollment_token, requested_id, peer)
        if task is not None and self._task is not None and task != self._task:
            self._refuse(requested_id, peer, task, self._task)
        client_id = requested_id or f"client-{uuid.uuid4().hex[:10]}"
        previous = self._clients.get(client_id)
        if previous is not None and not previous.left and certified_id is None:
            self._check_binding(previous, previous_credential, peer)
        elif previous is None or previous.left:
            self._check_capacity()
        credential = f"{client_id}.{secrets.token_urlsafe(24)}"
        record = ClientRecord(client_id, _sha256(credential), profile, now_ms(), last_seen=time.monotonic())
        await self._store.upsert_client(StoredClient(client_id, record.credential_sha256, profile, record.issued_ms))
        # Same budget, same limits: a memory decline stands until the device declares more memory.
        if previous is not None and previous.profile.memory_budget_mb == profile.memory_budget_mb:
            record.declined_kinds = previous.declined_kinds
        if previous is None or previous.left:
            self._registered += 1
        self._clients[client_id] = record
        self._unproven[client_id] = time.monotonic()
        self._unproven.move_to_end(client_id)
        _LOGGER.info("[Fleet.Join] %s joined (%s)", client_id, profile.platform or "?")
        return client_id, credential

    def _check_enrollment(self, token: str, requested_id: str, peer: str) -> None:
        """The token must be the device's own when it has one, else one of the fleet's."""
        device_hashes = self._auth.device_token_sha256
        if requested_id in device_hashes:
            accepted = [device_hashes[requested_id]]
        elif self._auth.require_device_tokens:
            raise errors.PermissionDenied(
                "this coordinator admits only devices with their own enrollment token "
                f"(auth.device_token_sha256); {requested_id or 'a random id'!r} has none"
            )
        else:
            accepted = self._enrollment_hashes
        token_hash = _sha256(token)
        if not any(hmac.compare_digest(token_hash, h) for h in accepted):
            raise self.peers.failed(peer) or errors.Unauthenticated("enrollment token is not valid")

    def _check_binding(self, previous: ClientRecord, previous_credential: str, peer: str) -> None:
        """A known id rejoins only with the credential it was issued, unless silent long enough."""
        if previous_credential and hmac.compare_digest(previous.credential_sha256, _sha256(previous_credential)):
            return
        release_s = self._auth.release_silent_id_s
        silent_s = time.monotonic() - previous.last_proof
        if release_s > 0 and silent_s > release_s and previous.polls == 0:
            _LOGGER.warning(
                "[Fleet.Join] %s silent for %.0f s: its id is given to a new join", previous.client_id, silent_s
            )
            return
        if previous_credential:
            raise self.peers.failed(peer) or errors.AlreadyExists(
                f"client id {previous.client_id} is bound to another credential than previous_credential"
            )
        raise errors.AlreadyExists(
            f"client id {previous.client_id} is taken: rejoin it with previous_credential (the credential it "
            "was issued), or join with another id"
        )

    def _check_capacity(self) -> None:
        if self._registered >= self._auth.max_clients:
            raise errors.ResourceExhausted(
                f"the federation has {self._registered} clients, auth.max_clients allows {self._auth.max_clients}"
            )
        horizon = time.monotonic() - self._heartbeat_timeout_s
        while self._unproven and next(iter(self._unproven.values())) < horizon:
            self._unproven.popitem(last=False)  # joined long ago and never called: no longer pending
        if len(self._unproven) >= self._auth.max_unproven_clients:
            raise errors.ResourceExhausted(
                f"{len(self._unproven)} joined clients have not called yet (auth.max_unproven_clients); retry shortly",
                self._heartbeat_timeout_s / 10,
            )

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
        self._prove(record)
        return client_id

    def _prove(self, record: ClientRecord) -> None:
        """The client called with its credential: alive, and from now on it may be sampled."""
        record.last_seen = record.last_proof = time.monotonic()
        if not record.proven:
            record.proven = True
            self._unproven.pop(record.client_id, None)

    async def leave(self, client_id: str) -> None:
        record = self._clients[client_id]
        if not record.left:
            self._registered -= 1
        record.left = True
        self._unproven.pop(client_id, None)
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
        self._prove(record)

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
            c.client_id
            for c in self._clients.values()
            if c.proven and self._alive(c) and self._unfit(c, task_kind) is None
        )

    def skipped(self, task_kind: str) -> dict[str, str]:
        """Connected clients that are not eligible, with the reason the ledger records."""
        out = {}
        for c in self._clients.values():
            reason = self._unfit(c, task_kind) if self._alive(c) else None
            if reason is not None:
                out[c.client_id] = reason
        return out
