"""The round engine: clients, cohorts, deadlines, updates, aggregation, the ledger.

It runs on the server's asyncio loop; CPU work (decoding, aggregation, evaluation)
goes to worker threads so RPCs keep flowing. It knows nothing about gRPC: servicers
translate its domain objects and errors (coordinator.errors) to and from the wire.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import random
import secrets
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from coordinator import errors
from coordinator.config import CoordinatorConfig
from coordinator.evaluation import evaluate_state
from coordinator.ledger import LedgerWriter
from coordinator.link_policy import DownloadTiming
from coordinator.store import StateStore, StoredRound, StoredUpdate
from coordinator.strategy import GENERATOR_ONNX, ClientResult, RoundPlan, State, Strategy
from coordinator.transfers import ClientPlan, RoundVariants, TransferPlanner
from coordinator.validation import UpdateRejected, validate_counts, validate_report, validate_state
from export.codec import (CodecError, EncodingSpec, apply_delta, bundle_from_bytes, bundle_to_bytes, decode_state,
                          encode_state)
from fedcore.models import Classifier, ClassifierConfig, state_spec, state_to_numpy

_LOGGER = logging.getLogger(__name__)

_CLIENT_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class ClientRecord:
    client_id: str
    credential_sha256: str
    profile: dict[str, Any]
    last_seen: float = 0.0  # time.monotonic() of the last authenticated call
    left: bool = False
    issued_ms: int = 0  # wall clock when the credential was issued (it survives restarts)
    # The device's own probes: not willing to train now, and why (DeviceState).
    not_ready: str | None = None
    # Kinds of task the client turned down for memory: task kind -> reason.
    declined_kinds: dict[str, str] = field(default_factory=dict)
    # Global-model artifacts the client says it holds decoded, newest first (PollTaskRequest).
    held_models: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainAssignment:
    round: int
    task_id: str
    deadline_unix_ms: int
    plan: RoundPlan
    strategy: str
    model_sha256: str
    model_size: int
    label_space: tuple[int, ...]
    extra_artifacts: tuple[dict[str, Any], ...] = ()  # {"kind", "sha256", "size", "encoding_name"}
    model_encoding: str = "fp32"
    upload_encoding: str = "fp32"


@dataclass(frozen=True)
class WaitAssignment:
    retry_after_ms: int
    reason: str


@dataclass(frozen=True)
class DoneAssignment:
    reason: str


Assignment = TrainAssignment | WaitAssignment | DoneAssignment


@dataclass(frozen=True)
class UploadHeader:
    round: int
    task_id: str
    idempotency_key: str
    num_examples: int
    label_counts: tuple[int, ...]
    payload_bytes: int
    payload_sha256: str
    metrics: dict[str, float]
    train_seconds: float
    # The task's downloads as the client timed them.
    downloads: tuple[DownloadTiming, ...] = ()


@dataclass(frozen=True)
class UploadResult:
    round: int
    duplicate: bool
    received_bytes: int


@dataclass(frozen=True)
class Event:
    kind: str  # opened | accepted | rejected | committed | failed | finished | joined
    round: int
    client_id: str = ""
    message: str = ""
    cohort_size: int = 0
    updates_received: int = 0
    ledger_row: dict[str, Any] | None = None
    unix_ms: int = field(default_factory=_now_ms)


@dataclass
class OpenRound:
    round: int
    attempt: int
    cohort: dict[str, str]  # client_id -> task_id
    model_sha256: str
    opened_ms: int
    deadline_ms: int
    plan: RoundPlan
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    accepted: dict[str, StoredUpdate] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)
    # Connected clients left out of the sample when the round opened, and why.
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_down: Counter[str] = field(default_factory=Counter)
    bytes_up: Counter[str] = field(default_factory=Counter)  # requests other than the update
    # The round's artifacts in every encoding, and each client's encodings (fixed at its first poll).
    variants: RoundVariants = field(default_factory=RoundVariants)
    plans: dict[str, ClientPlan] = field(default_factory=dict)
    encode_seconds: float = 0.0  # making those encodings, before the round opened
    closed: bool = False
    # Held from an upload's last check to its entry in `accepted`, and by the engine to close the
    # round: an update is either counted or refused, never acknowledged and then left out.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def all_in(self) -> bool:
        return len(self.accepted) + len(self.rejected) + len(self.declined) >= len(self.cohort)


class Federation:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: StateStore,
        strategy: Strategy,
        test_set: tuple[np.ndarray, np.ndarray] | None,
        model_config: ClassifierConfig = ClassifierConfig(),
    ) -> None:
        self.config = config
        self.store = store
        self.strategy = strategy
        self.test_set = test_set
        self.model_config = model_config
        self.spec = state_spec(Classifier(model_config))
        self.transfers = TransferPlanner(config.bandwidth, store.blobs,
                                         {k: (shape, dtype.kind == "f") for k, (shape, dtype) in self.spec.items()})
        self.ledger = LedgerWriter(store.state_dir)
        self._enrollment_hashes = config.auth.enrollment_hashes()
        self._clients: dict[str, ClientRecord] = {}
        self._polling: Counter[str] = Counter()  # long polls in flight per client
        self._changed = asyncio.Condition()  # the round engine waits on this
        self._poll_wake: dict[str, asyncio.Event] = {}
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._round: OpenRound | None = None
        self._paused = False
        self._stop_requested = False
        self.finished = False
        self.told_done: set[str] = set()
        self.recovering = True
        self.last_accuracy = float("nan")
        self._init_state()

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        s = self.store
        self.federation_id = s.get_meta("federation_id") or uuid.uuid4().hex[:12]
        self.current_round = int(s.get_meta("current_round", "0") or 0)
        model_sha = s.get_meta("global_model")
        if model_sha is None:
            torch.manual_seed(self.config.federation.seed)
            model_sha = s.blobs.put(self._model_bytes(state_to_numpy(Classifier(self.model_config))))
            s.set_meta(federation_id=self.federation_id, current_round="0", global_model=model_sha)
            _LOGGER.info("new federation %s", self.federation_id)
        else:
            _LOGGER.info("resuming federation %s at round %d", self.federation_id, self.current_round)
        self.global_model_sha = model_sha
        for cid, cred, profile, left, issued_ms in s.clients():
            self._clients[cid] = ClientRecord(cid, cred, profile, left=left is not None, issued_ms=issued_ms)
        strategy_state = s.get_meta("strategy_state")
        if strategy_state is not None:
            self.strategy.load_state_bytes(s.blobs.get(strategy_state))
        rows = s.ledger()
        if rows:
            self.last_accuracy = rows[-1].get("test_accuracy", float("nan"))
        self.finished = self.current_round >= self.config.federation.rounds

    @staticmethod
    def _model_bytes(state: State) -> bytes:
        return bundle_to_bytes(encode_state(state, EncodingSpec()))

    def load_state(self, sha: str) -> State:
        return decode_state(bundle_from_bytes(self.store.blobs.get(sha)))

    # ---------------------------------------------------------------- clients
    async def join(self, enrollment_token: str, profile: dict[str, Any], requested_id: str) -> tuple[str, str]:
        """Exchanges an enrollment token for (client_id, credential)."""
        token_hash = _sha256(enrollment_token)
        if not any(hmac.compare_digest(token_hash, h) for h in self._enrollment_hashes):
            raise errors.Unauthenticated("enrollment token is not valid")
        if requested_id:
            if len(requested_id) > 64 or not set(requested_id) <= _CLIENT_ID_CHARS:
                raise errors.InvalidArgument(
                    "requested_client_id must be 1-64 characters of letters, digits, '-', '_' or '.'"
                )
            client_id = requested_id
        else:
            client_id = f"client-{uuid.uuid4().hex[:10]}"
        credential = f"{client_id}.{secrets.token_urlsafe(24)}"
        cred_hash = _sha256(credential)
        issued_ms = _now_ms()
        await asyncio.to_thread(self.store.upsert_client, client_id, cred_hash, profile, issued_ms)
        record = ClientRecord(client_id, cred_hash, profile, last_seen=time.monotonic(), issued_ms=issued_ms)
        previous = self._clients.get(client_id)
        # Same budget, same limits: a memory decline stands until the device declares more memory.
        if previous is not None and previous.profile.get("memory_budget_mb") == profile.get("memory_budget_mb"):
            record.declined_kinds = previous.declined_kinds
        self._clients[client_id] = record
        self.transfers.estimator.seed(client_id, float(profile.get("link_down_bps", 0)),
                                      float(profile.get("link_up_bps", 0)))
        _LOGGER.info("[Fleet.Join] %s joined (%s)", client_id, profile.get("platform", "?"))
        self._emit(Event("joined", self.current_round, client_id=client_id))
        await self._notify()
        return client_id, credential

    def authenticate(self, credential: str | None) -> str:
        """The client id a credential belongs to; UNAUTHENTICATED otherwise."""
        if not credential:
            raise errors.Unauthenticated("missing credential: send 'authorization: Bearer <credential>' metadata")
        client_id = credential.split(".", 1)[0]
        record = self._clients.get(client_id)
        if record is None or not hmac.compare_digest(record.credential_sha256, _sha256(credential)):
            raise errors.Unauthenticated("unknown client or bad credential")
        if record.left:
            raise errors.Unauthenticated(f"client {client_id} has left the federation; join again")
        if self._expired(record):
            raise errors.Unauthenticated(
                f"credential of {client_id} expired (older than {self.config.auth.credential_ttl_s:g} s); join again")
        record.last_seen = time.monotonic()
        return client_id

    async def leave(self, client_id: str) -> None:
        self._clients[client_id].left = True
        await asyncio.to_thread(self.store.mark_left, client_id, _now_ms())
        await self._notify()

    def all_told_done(self) -> bool:
        """Whether every eligible client has heard DONE (so the server may exit)."""
        return set(self.eligible_clients()) <= self.told_done

    def eligible_clients(self) -> list[str]:
        """Clients that have not left, hold a valid credential and are alive: inside a long poll
        now, or seen recently."""
        return sorted(c.client_id for c in self._clients.values() if self._alive(c) and self._unfit(c) is None)

    def _alive(self, c: ClientRecord) -> bool:
        horizon = time.monotonic() - self.config.federation.heartbeat_timeout_s
        return not c.left and not self._expired(c) and (self._polling[c.client_id] > 0 or c.last_seen >= horizon)

    def _unfit(self, c: ClientRecord) -> str | None:
        """Why a connected client may not be sampled now (its own conditions or a memory decline)."""
        if c.not_ready is not None:
            return f"not ready: {c.not_ready}"
        declined = c.declined_kinds.get(self.task_kind())
        return f"declined this kind of task: {declined}" if declined is not None else None

    def skipped_clients(self) -> dict[str, str]:
        """Connected clients that are not eligible, with the reason the ledger records."""
        out = {}
        for c in self._clients.values():
            if self._alive(c):
                reason = self._unfit(c)
                if reason is not None:
                    out[c.client_id] = reason
        return out

    def task_kind(self) -> str:
        """What a memory decline is about: the strategy and the shape of local training."""
        t = self.config.training
        return f"{self.strategy.name}/batch{t.batch_size}"

    async def update_state(self, client_id: str, not_ready: bool, reason: str) -> None:
        """The device's probes said whether it is willing to train (sent on PollTask and Heartbeat)."""
        record = self._clients[client_id]
        before = record.not_ready
        record.not_ready = (reason or "no reason given")[:200] if not_ready else None
        if before != record.not_ready:
            _LOGGER.info("[Fleet] %s is %s", client_id, f"not ready ({record.not_ready})" if not_ready else "ready")
            await self._notify()

    async def decline(self, client_id: str, round_: int, task_id: str, kind: str, detail: str) -> None:
        """A sampled client turns its task down; for memory, it is not sampled for this kind of task again."""
        if self.recovering:
            raise errors.Unavailable("the coordinator is recovering its state after a restart; retry shortly")
        r = self._round
        if r is None or r.closed or r.round != round_ or r.cohort.get(client_id) != task_id:
            raise errors.FailedPrecondition(f"task {task_id!r} of round {round_} is not open for {client_id}")
        if client_id in r.accepted:
            raise errors.FailedPrecondition(f"{client_id} already delivered an update for round {round_}")
        detail = (detail or "no detail given")[:300]
        reason = f"{kind}: {detail}"
        r.declined[client_id] = reason
        if kind == "memory":
            self._clients[client_id].declined_kinds[self.task_kind()] = detail
        _LOGGER.warning("round %d: %s declined its task (%s)", round_, client_id, reason)
        self._emit(Event("rejected", round_, client_id, message=f"declined: {reason}"))
        await self._notify()

    def _expired(self, record: ClientRecord) -> bool:
        ttl_s = self.config.auth.credential_ttl_s
        return ttl_s > 0 and _now_ms() - record.issued_ms > ttl_s * 1000

    # ------------------------------------------------------------------ tasks
    async def poll(self, client_id: str, max_wait_s: float, held_models: Iterable[str] = ()) -> Assignment:
        """Long poll: a task as soon as there is one for this client, WAIT after max_wait_s.

        ``held_models``: global-model artifacts the client holds decoded (at most 4 are kept)."""
        held = [h.lower() for h in held_models][:4]
        if any(len(h) != 64 or any(c not in "0123456789abcdef" for c in h) for h in held):
            raise errors.InvalidArgument("held_models must be sha256 artifact ids (64 hex digits)")
        self._clients[client_id].held_models = held
        loop = asyncio.get_running_loop()
        until = loop.time() + max_wait_s
        self._polling[client_id] += 1
        try:
            return await self._poll_until(client_id, until)
        finally:
            self._polling[client_id] -= 1
            self._clients[client_id].last_seen = time.monotonic()

    async def _poll_until(self, client_id: str, until: float) -> Assignment:
        """Waits on this client's own event, set only when its answer may have changed (a round
        opened with it in the cohort, or the federation finished): with N clients polling, an
        upload or a join wakes no poll at all, instead of all N."""
        loop = asyncio.get_running_loop()
        while True:
            self._clients[client_id].last_seen = time.monotonic()
            assignment = self._assignment_for(client_id)
            if assignment is not None:
                return assignment
            remaining = until - loop.time()
            if remaining <= 0:
                return WaitAssignment(100, self._wait_reason(client_id))  # a long poll: ask again at once
            wake = self._poll_wake.setdefault(client_id, asyncio.Event())
            wake.clear()  # no await since the check above: a wake-up cannot be missed
            try:
                await asyncio.wait_for(wake.wait(), remaining)
            except TimeoutError:
                pass

    def _wake_polls(self, client_ids: Iterable[str] | None = None) -> None:
        """Wakes the long polls of these clients (all when None) to look at their assignment again."""
        targets = self._poll_wake.keys() if client_ids is None else client_ids
        for cid in list(targets):
            event = self._poll_wake.get(cid)
            if event is not None:
                event.set()

    def _assignment_for(self, client_id: str) -> Assignment | None:
        if self.finished:
            self.told_done.add(client_id)
            return DoneAssignment("federation finished")
        r = self._round
        if (r is None or r.closed or client_id not in r.cohort or client_id in r.accepted
                or client_id in r.rejected or client_id in r.declined):
            return None
        plan = r.plans.get(client_id)
        if plan is None:
            plan = r.plans[client_id] = self.transfers.plan(client_id, r.variants,
                                                            self._clients[client_id].held_models)
        extra = tuple(
            {"kind": a["kind"], "sha256": plan.generator.sha256, "size": plan.generator.size,
             "encoding_name": plan.generator.name}
            if a["kind"] == GENERATOR_ONNX and plan.generator is not None else a
            for a in r.artifacts
        )
        return TrainAssignment(
            round=r.round,
            task_id=r.cohort[client_id],
            deadline_unix_ms=r.deadline_ms,
            plan=r.plan,
            strategy=self.strategy.name,
            model_sha256=plan.model.sha256,
            model_size=plan.model.size,
            label_space=tuple(self.strategy.label_space(self.model_config.n_classes)),
            extra_artifacts=extra,
            model_encoding=plan.model.name,
            upload_encoding=plan.upload_encoding,
        )

    def _wait_reason(self, client_id: str) -> str:
        r = self._round
        if self._paused:
            return "federation paused"
        if r is None:
            return "waiting for enough clients to open a round"
        if client_id in r.accepted:
            return f"update for round {r.round} received; waiting for the next round"
        return f"not sampled for round {r.round}"

    def record_download(self, client_id: str, nbytes: int) -> None:
        """Bytes of a message the coordinator sent a client of the open round's cohort."""
        r = self._round
        if r is not None and client_id in r.cohort:
            r.bytes_down[client_id] += nbytes

    def record_upload(self, client_id: str, nbytes: int) -> None:
        """Bytes of a request a cohort client sent besides its update (task poll, download requests,
        heartbeats): the update itself is counted with it, once, when it is accepted."""
        r = self._round
        if r is not None and client_id in r.cohort:
            r.bytes_up[client_id] += nbytes

    def published_artifacts(self) -> set[str]:
        """What a client may download: the global model and the open round's artifacts. Never
        another client's update, nor anything else in the store."""
        ids = {self.global_model_sha}
        r = self._round
        if r is not None:
            ids.add(r.model_sha256)
            ids.update(a["sha256"] for a in r.artifacts)
            ids.update(r.variants.digests())
            ids.update(p.model.sha256 for p in r.plans.values())  # per-client deltas
        return ids

    def artifact_bytes(self, artifact_id: str) -> bytes:
        if artifact_id not in self.published_artifacts() or not self.store.blobs.has(artifact_id):
            raise errors.NotFound(f"artifact {artifact_id[:80]!r} not found")
        return self.store.blobs.get(artifact_id)

    # ---------------------------------------------------------------- uploads
    def check_upload_header(self, client_id: str, header: UploadHeader) -> UploadResult | None:
        """Cheap checks before the payload is read; returns an ack for a duplicate."""
        if not header.idempotency_key or len(header.idempotency_key) > 128:
            raise errors.InvalidArgument("idempotency_key must be 1-128 characters")
        if self.recovering:  # the open round is not back yet: a retry in a moment will find it
            raise errors.Unavailable("the coordinator is recovering its state after a restart; retry shortly")
        previous = self.store.find_update(header.idempotency_key)
        if previous is not None:
            if previous.client_id != client_id:
                raise errors.InvalidArgument("idempotency_key was already used by another client")
            return UploadResult(previous.round, True, previous.bytes_up)
        r = self._round
        if r is None or r.closed or header.round != r.round:
            open_desc = f"round {r.round} is open" if r is not None and not r.closed else "no round is open"
            raise errors.FailedPrecondition(f"update for round {header.round} rejected: {open_desc}")
        if r.cohort.get(client_id) != header.task_id:
            raise errors.FailedPrecondition(f"task {header.task_id!r} is not assigned to {client_id} in round {r.round}")
        if client_id in r.accepted:
            raise errors.FailedPrecondition(f"{client_id} already delivered an update for round {r.round}")
        if header.payload_bytes > self.config.server.max_update_bytes:
            raise errors.ResourceExhausted(
                f"update of {header.payload_bytes} bytes exceeds the limit of {self.config.server.max_update_bytes}"
            )
        return None

    async def accept_upload(self, client_id: str, header: UploadHeader, payload: bytes, bytes_up: int,
                            up_seconds: float = 0.0) -> UploadResult:
        """Validates and persists an update, then (only then) acknowledges it.

        A difference against the round's model (any of its encodings) is added to the
        full-precision model here, so what is stored and aggregated is always a whole state.
        """
        duplicate = self.check_upload_header(client_id, header)
        if duplicate is not None:
            return duplicate
        r = self._round
        assert r is not None
        try:
            stored = await asyncio.to_thread(self._validate_payload, header, payload, r)
        except UpdateRejected as err:
            await self.reject(client_id, r.round, str(err))
            raise errors.InvalidArgument(str(err)) from None
        digest = await asyncio.to_thread(self.store.blobs.put, stored)
        plan = r.plans.get(client_id)
        encoding = plan.upload_encoding if plan is not None else "fp32"
        down_seconds = self.transfers.observe_downloads(client_id, header.downloads)
        self.transfers.observe_upload(client_id, encoding, bytes_up, up_seconds)
        metrics = {**header.metrics, "wire_down_seconds": round(down_seconds, 4),
                   "wire_up_seconds": round(up_seconds, 4)}
        update = StoredUpdate(
            idempotency_key=header.idempotency_key,
            round=r.round,
            attempt=r.attempt,
            client_id=client_id,
            task_id=header.task_id,
            payload_sha256=digest,
            num_examples=header.num_examples,
            label_counts=list(header.label_counts),
            metrics=metrics,
            train_seconds=header.train_seconds,
            bytes_up=bytes_up,
            received_ms=_now_ms(),
        )
        async with r.lock:
            if r.closed or self._round is not r:
                raise errors.FailedPrecondition(f"round {r.round} closed while the update was being checked")
            earlier = r.accepted.get(client_id)
            if earlier is not None:  # a concurrent retry of the same upload got here first
                if earlier.idempotency_key == update.idempotency_key:
                    return UploadResult(r.round, True, earlier.bytes_up)
                raise errors.FailedPrecondition(f"{client_id} already delivered an update for round {r.round}")
            await asyncio.to_thread(self.store.add_update, update)
            r.accepted[client_id] = update
            r.rejected.pop(client_id, None)  # a corrected retry within the round replaces a rejection
        _LOGGER.info("[Fleet.UploadUpdate] round %d: accepted update from %s (%d bytes)", r.round, client_id, bytes_up)
        self._emit(Event("accepted", r.round, client_id, cohort_size=len(r.cohort), updates_received=len(r.accepted)))
        await self._notify()
        return UploadResult(r.round, False, bytes_up)

    def _validate_payload(self, header: UploadHeader, payload: bytes, r: OpenRound) -> bytes:
        """The checked update as the bytes to store: a whole fp32 state (deltas applied)."""
        if len(payload) != header.payload_bytes:
            raise UpdateRejected(f"payload has {len(payload)} bytes, header declared {header.payload_bytes}")
        if hashlib.sha256(payload).hexdigest() != header.payload_sha256.lower():
            raise UpdateRejected("payload sha256 does not match the header's payload_sha256")
        plan = self._round.plan if self._round is not None else None
        validate_counts(header.num_examples, header.label_counts, self.model_config.n_classes,
                        plan.local_steps * plan.batch_size if plan is not None else None)
        validate_report(header.metrics, header.train_seconds)
        if len(header.downloads) > 16 or not all(d.valid() for d in header.downloads):
            raise UpdateRejected("downloads: at most 16 timings, each with 0 <= first_chunk_seconds <= seconds "
                                 "<= 86400 and first_chunk_bytes <= wire_bytes")
        try:
            bundle = bundle_from_bytes(payload)
            state = decode_state(bundle)
            if bundle.base_sha256:
                bases = ({r.model_sha256} | {v.sha256 for v in r.variants.model.values()}
                         | {p.model.sha256 for p in r.plans.values()})
                if bundle.base_sha256 not in bases:
                    raise UpdateRejected(f"update is a difference against {bundle.base_sha256[:16]!r}, which is "
                                         f"not round {r.round}'s global model")
                validate_state(state, self.spec)
                state = apply_delta(self.load_state(r.model_sha256), state)
        except CodecError as err:
            raise UpdateRejected(str(err)) from None
        validate_state(state, self.spec)
        return payload if not bundle.base_sha256 else bundle_to_bytes(encode_state(state, EncodingSpec()))

    async def reject(self, client_id: str, round_: int, reason: str) -> None:
        """Counts a rejected update in the round's ledger; the round goes on with everyone else."""
        _LOGGER.warning("round %d: rejected update from %s: %s", round_, client_id, reason)
        r = self._round
        if r is not None and r.round == round_ and client_id in r.cohort and client_id not in r.accepted:
            r.rejected[client_id] = reason
        self._emit(Event("rejected", round_, client_id, message=reason))
        await self._notify()

    # ----------------------------------------------------------------- rounds
    async def run(self) -> None:
        """The federation: open, wait, aggregate, commit; until the last round or Stop."""
        await self._recover()
        fed = self.config.federation
        while not self.finished:
            if self._stop_requested or self.current_round >= fed.rounds:
                await self._finish("stopped by operator" if self._stop_requested else "all rounds done")
                break
            if self._paused:
                await self._wait_changed(1.0)
                continue
            eligible = self.eligible_clients()
            if len(eligible) < fed.required_clients:
                await self._wait_changed(1.0)
                continue
            await self._open_round(eligible)
            await self._run_open_round()

    async def _recover(self) -> None:
        """Reopens a round a crash left open, with the updates acknowledged before it."""
        for stored in self.store.open_rounds():
            if stored.round != self.current_round:
                await asyncio.to_thread(self.store.fail_round, stored.round, stored.attempt)
                continue
            deadline = max(stored.deadline_ms, _now_ms() + int(self.config.federation.round_timeout_s * 1000))
            r = OpenRound(stored.round, stored.attempt, stored.cohort, stored.model_sha256, stored.opened_ms,
                          deadline, self.strategy.configure_round(stored.round), list(stored.artifacts))
            r.variants = await asyncio.to_thread(self._prepare_variants, r.model_sha256, r.artifacts)
            for u in self.store.updates_for(stored.round, stored.attempt):
                r.accepted[u.client_id] = u
            await asyncio.to_thread(self.store.set_round_deadline, r.round, r.attempt, deadline)
            self._round = r
            self._wake_polls(r.cohort)
            _LOGGER.info("recovered round %d with %d acknowledged update(s)", r.round, len(r.accepted))
        await asyncio.to_thread(lambda: self.ledger.write(self.store.ledger()))
        self.recovering = False
        if self._round is not None:
            await self._run_open_round()

    async def _open_round(self, eligible: list[str]) -> None:
        fed = self.config.federation
        round_ = self.current_round
        attempt = self.store.max_attempt(round_) + 1
        rng = random.Random(f"{fed.seed}:{round_}:{attempt}")
        cohort_ids = rng.sample(eligible, min(fed.clients_per_round, len(eligible)))
        cohort = {cid: uuid.uuid4().hex for cid in sorted(cohort_ids)}
        skipped = self.skipped_clients()
        artifacts = []
        for artifact in await asyncio.to_thread(self.strategy.round_artifacts, round_):
            digest = await asyncio.to_thread(self.store.blobs.put, artifact.data)
            artifacts.append({"kind": artifact.kind, "sha256": digest, "size": len(artifact.data)})
        t0 = time.monotonic()
        variants = await asyncio.to_thread(self._prepare_variants, self.global_model_sha, artifacts)
        encode_s = time.monotonic() - t0
        opened = _now_ms()
        deadline = opened + int(fed.round_timeout_s * 1000)
        stored = StoredRound(round_, attempt, "open", cohort, self.global_model_sha, opened, deadline, artifacts)
        await asyncio.to_thread(self.store.open_round, stored)
        self._round = OpenRound(round_, attempt, cohort, self.global_model_sha, opened, deadline,
                                self.strategy.configure_round(round_), artifacts, skipped=skipped, variants=variants,
                                encode_seconds=encode_s)
        _LOGGER.info("round %d (attempt %d) opened with cohort %s", round_, attempt, sorted(cohort))
        self._emit(Event("opened", round_, cohort_size=len(cohort)))
        self._wake_polls(cohort)
        await self._notify()

    def _prepare_variants(self, model_sha: str, artifacts: list[dict[str, Any]]) -> RoundVariants:
        generator = next((a["sha256"] for a in artifacts if a["kind"] == GENERATOR_ONNX), None)
        return self.transfers.prepare(model_sha, generator)

    async def _run_open_round(self) -> None:
        r = self._round
        assert r is not None
        while not r.all_in and _now_ms() < r.deadline_ms:
            await self._wait_changed(min(1.0, max(0.01, (r.deadline_ms - _now_ms()) / 1000)))
        async with r.lock:  # waits for an upload between its last check and its acknowledgement
            r.closed = True
        await self._notify()
        wait_s = (_now_ms() - r.opened_ms) / 1000
        if len(r.accepted) < self.config.federation.min_completed:
            await asyncio.to_thread(self.store.fail_round, r.round, r.attempt)
            msg = f"only {len(r.accepted)} update(s) by the deadline, {self.config.federation.min_completed} needed"
            _LOGGER.warning("round %d attempt %d failed: %s", r.round, r.attempt, msg)
            self._emit(Event("failed", r.round, message=msg, cohort_size=len(r.cohort),
                             updates_received=len(r.accepted)))
            self._round = None
            return
        await self._commit(r, wait_s)

    async def _commit(self, r: OpenRound, wait_s: float) -> None:
        t0 = time.monotonic()
        global_state = await asyncio.to_thread(self.load_state, r.model_sha256)
        results = await asyncio.to_thread(self._client_results, r)
        aggregate = await asyncio.to_thread(self.strategy.aggregate_round, r.round, results, global_state)
        model_sha = await asyncio.to_thread(lambda: self.store.blobs.put(self._model_bytes(aggregate.state)))
        aggregate_s = time.monotonic() - t0
        t1 = time.monotonic()
        accuracy, loss = float("nan"), float("nan")
        last = r.round + 1 >= self.config.federation.rounds
        if self.test_set is not None and ((r.round + 1) % self.config.data.evaluate_every == 0 or last):
            ev = await asyncio.to_thread(evaluate_state, aggregate.state, *self.test_set, self.model_config)
            accuracy, loss = ev.accuracy, ev.loss
        evaluate_s = time.monotonic() - t1
        row = self._ledger_row(r, wait_s, aggregate_s, evaluate_s, accuracy, loss, aggregate.extras)
        row["model_sha256"] = model_sha
        meta = {"current_round": str(r.round + 1), "global_model": model_sha}
        strategy_state = await asyncio.to_thread(self.strategy.state_bytes)
        if strategy_state is not None:
            meta["strategy_state"] = await asyncio.to_thread(self.store.blobs.put, strategy_state)
        await asyncio.to_thread(self.store.commit_round, r.round, r.attempt, row, meta)
        await asyncio.to_thread(lambda: self.ledger.write(self.store.ledger()))
        self.global_model_sha = model_sha
        self.current_round = r.round + 1
        if accuracy == accuracy:
            self.last_accuracy = accuracy
        self._round = None
        _LOGGER.info(
            "round %d committed: %d/%d updates, accuracy %.4f, %.0f B down, %.0f B up",
            r.round, row["completed"], row["cohort_size"], accuracy, row["bytes_down"], row["bytes_up"],
        )
        self._emit(Event("committed", r.round, cohort_size=len(r.cohort), updates_received=len(r.accepted),
                         ledger_row=row))
        await self._notify()

    def _client_results(self, r: OpenRound) -> list[ClientResult]:
        return [
            ClientResult(u.client_id, self.load_state(u.payload_sha256), u.num_examples, u.label_counts, u.metrics)
            for u in sorted(r.accepted.values(), key=lambda u: u.client_id)
        ]

    def _ledger_row(self, r: OpenRound, wait_s: float, aggregate_s: float, evaluate_s: float,
                    accuracy: float, loss: float, extras: dict[str, float]) -> dict[str, Any]:
        clients = []
        for cid in sorted(r.cohort):
            u = r.accepted.get(cid)
            if u is not None:
                outcome, reason = "completed", ""
            elif cid in r.rejected:
                outcome, reason = "rejected", r.rejected[cid]
            elif cid in r.declined:
                outcome, reason = "declined", r.declined[cid]
            else:
                outcome, reason = "dropped", "no valid update before the round's deadline"
            metrics = dict(u.metrics) if u else {}
            plan = r.plans.get(cid)
            clients.append({
                "client_id": cid, "outcome": outcome, "reason": reason,
                "bytes_down": int(r.bytes_down[cid]), "bytes_up": int(r.bytes_up[cid] + (u.bytes_up if u else 0)),
                "num_examples": int(u.num_examples if u else 0), "train_seconds": float(u.train_seconds if u else 0.0),
                "metrics": metrics,
                **(plan.ledger_fields() if plan is not None else {}),
                "down_seconds": float(metrics.pop("wire_down_seconds", 0.0)),
                "up_seconds": float(metrics.pop("wire_up_seconds", 0.0)),
            })
        committed = _now_ms()
        extras = dict(extras)
        extras["encode_artifacts_seconds"] = round(r.encode_seconds, 4)
        # Federated evaluation (the paper's metric): the round's incoming global model on the
        # cohort's own label-restricted local test splits, as the clients measured it.
        local = [(c["metrics"]["local_test_correct"], c["metrics"]["local_test_total"]) for c in clients
                 if "local_test_correct" in c["metrics"] and "local_test_total" in c["metrics"]]
        total = sum(t for _, t in local if t)
        if total:
            extras["federated_accuracy"] = sum(c for c, t in local if t) / total
        # What the round cost the devices, as they measured it (edge_client reports these).
        for key, name, agg in (("peak_rss_mb", "client_peak_rss_mb_max", max),
                               ("cpu_seconds", "client_cpu_seconds_mean", statistics.fmean)):
            values = [c["metrics"][key] for c in clients if key in c["metrics"]]
            if values:
                extras[name] = round(float(agg(values)), 3)
        return {
            "round": r.round,
            "attempt": r.attempt,
            "strategy": self.strategy.name,
            "cohort_size": len(r.cohort),
            "completed": sum(c["outcome"] == "completed" for c in clients),
            "dropped": sum(c["outcome"] == "dropped" for c in clients),
            "rejected": sum(c["outcome"] == "rejected" for c in clients),
            "declined": sum(c["outcome"] == "declined" for c in clients),
            "skipped": [{"client_id": cid, "reason": why} for cid, why in sorted(r.skipped.items())],
            "bytes_down": sum(c["bytes_down"] for c in clients),
            "bytes_up": sum(c["bytes_up"] for c in clients),
            "wait_seconds": round(wait_s, 4),
            "aggregate_seconds": round(aggregate_s, 4),
            "evaluate_seconds": round(evaluate_s, 4),
            "round_seconds": round((committed - r.opened_ms) / 1000, 4),
            "test_accuracy": accuracy,
            "test_loss": loss,
            "opened_unix_ms": r.opened_ms,
            "committed_unix_ms": committed,
            "clients": clients,
            "extras": extras,
            "encoding_policy": self.config.bandwidth.policy,
            "transfer_budget_seconds": self.config.bandwidth.transfer_budget_s if self.transfers.adaptive else 0.0,
        }

    async def _finish(self, reason: str) -> None:
        self.finished = True
        _LOGGER.info("federation %s finished: %s", self.federation_id, reason)
        self._emit(Event("finished", self.current_round, message=reason))
        self._wake_polls()
        await self._notify()

    # --------------------------------------------------------------- control
    async def pause(self) -> None:
        self._paused = True
        await self._notify()

    async def resume(self) -> None:
        self._paused = False
        await self._notify()

    async def stop(self) -> None:
        self._stop_requested = True
        await self._notify()

    def status(self) -> dict[str, Any]:
        r = self._round
        if self.finished:
            state = "finished"
        elif self._paused:
            state = "paused"
        elif r is None:
            state = "waiting_for_clients"
        else:
            state = "training"
        return {
            "federation_id": self.federation_id,
            "state": state,
            "current_round": self.current_round,
            "total_rounds": self.config.federation.rounds,
            "connected_clients": sum(self._alive(c) for c in self._clients.values()),
            "eligible_clients": len(self.eligible_clients()),
            "cohort_size": len(r.cohort) if r else 0,
            "updates_received": len(r.accepted) if r else 0,
            "strategy": self.strategy.name,
            "last_accuracy": self.last_accuracy,
        }

    # ---------------------------------------------------------------- events
    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)

    def _emit(self, event: Event) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a stuck watcher must not stall the federation
                self._subscribers.discard(queue)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _wait_changed(self, timeout: float) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass


FederationFactory = Callable[[], Federation]
