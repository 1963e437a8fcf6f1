"""What a sampled client sends back: its update (checked, persisted, then acknowledged) or its refusal.

An upload passes four gates in order: the header (cheap checks before the payload is read; a
retried upload is recognised by its idempotency key and acknowledged again), the payload (its
digest, taken as it arrived; then counts, report, tensors in a worker thread), the blob store
(the payload is durable), and the state store (the update's record is durable). Only then is it
acknowledged. A bad update is refused with a message that names what was wrong, counted in the
ledger, and the round goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

from fedgen.coordinator import errors
from fedgen.coordinator.config import ServerConfig
from fedgen.coordinator.engine import RoundEngine, state_bytes
from fedgen.coordinator.events import ChangeSignal, Event, EventBus, now_ms
from fedgen.coordinator.ledger import WIRE_DOWN_SECONDS, WIRE_UP_SECONDS
from fedgen.coordinator.link_policy import DownloadTiming
from fedgen.coordinator.records import UpdateRecord
from fedgen.coordinator.registry import ClientRegistry
from fedgen.coordinator.rounds import OpenRound
from fedgen.coordinator.store import StateStore, is_disk_full
from fedgen.coordinator.upload_spool import SpooledPayload
from fedgen.coordinator.validation import UpdateRejected, validate_counts, validate_report, validate_state
from fedgen.export.codec import CodecError, Encoding, apply_delta, bundle_from_bytes, decode_state

_LOGGER = logging.getLogger(__name__)

#: Timed downloads an upload may report.
MAX_DOWNLOAD_TIMINGS = 16
MAX_IDEMPOTENCY_KEY = 128
#: When a client whose upload met a full disk may retry.
DISK_FULL_RETRY_S = 5.0


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


def disk_full_error(err: BaseException) -> errors.ResourceExhausted:
    """What a client whose update met a full disk is told: try again (its update was not kept)."""
    _LOGGER.error("[Fleet.UploadUpdate] not stored, the disk is full: %s", err)
    return errors.ResourceExhausted(
        "the coordinator's disk is full: the update was not stored; retry (same idempotency key)",
        DISK_FULL_RETRY_S,
    )


def _check_digest(header: UploadHeader, size: int, sha256: str) -> None:
    if size != header.payload_bytes:
        raise UpdateRejected(f"payload has {size} bytes, header declared {header.payload_bytes}")
    if sha256 != header.payload_sha256.lower():
        raise UpdateRejected("payload sha256 does not match the header's payload_sha256")


class UploadIntake:
    def __init__(
        self,
        server: ServerConfig,
        engine: RoundEngine,
        store: StateStore,
        registry: ClientRegistry,
        bus: EventBus,
        changed: ChangeSignal,
    ) -> None:
        self._server = server
        self._engine = engine
        self._store = store
        self._registry = registry
        self._bus = bus
        self._changed = changed
        self._checks = asyncio.Semaphore(server.max_concurrent_upload_checks)

    def _open_round(self, round_: int) -> OpenRound:
        if self._engine.recovering:  # the open round is not back yet: a retry in a moment will find it
            raise errors.Recovering()
        r = self._engine.open_round
        if r is None or r.closed or round_ != r.round:
            open_desc = f"round {r.round} is open" if r is not None and not r.closed else "no round is open"
            raise errors.FailedPrecondition(f"update for round {round_} rejected: {open_desc}")
        return r

    # --------------------------------------------------------------- updates
    async def check_header(self, client_id: str, header: UploadHeader) -> UploadResult | None:
        """Cheap checks before the payload is read; returns an acknowledgement for a duplicate."""
        if not header.idempotency_key or len(header.idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise errors.InvalidArgument(f"idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} characters")
        if self._engine.recovering:
            raise errors.Recovering()
        previous = await self._store.find_update(header.idempotency_key)
        if previous is not None:
            if previous.client_id != client_id:
                raise errors.InvalidArgument("idempotency_key was already used by another client")
            return UploadResult(previous.round, True, previous.bytes_up)
        r = self._open_round(header.round)
        if r.cohort.get(client_id) != header.task_id:
            raise errors.FailedPrecondition(
                f"task {header.task_id!r} is not assigned to {client_id} in round {r.round}"
            )
        if client_id in r.accepted:
            raise errors.FailedPrecondition(f"{client_id} already delivered an update for round {r.round}")
        if header.payload_bytes > self._server.max_update_bytes:
            raise errors.ResourceExhausted(
                f"update of {header.payload_bytes} bytes exceeds the limit of {self._server.max_update_bytes}"
            )
        return None

    async def accept(
        self,
        client_id: str,
        header: UploadHeader,
        payload: bytes | SpooledPayload,
        bytes_up: int,
        up_seconds: float = 0.0,
    ) -> UploadResult:
        """Validates and persists an update, then (only then) acknowledges it.

        `payload` is the bytes, or the scratch file a stream was written to (its size and digest
        already known, so a payload that does not match its header is refused unread). A
        difference against the round's model (any of its encodings) is added to the
        full-precision model here, so what is stored and aggregated is always a whole state.
        """
        duplicate = await self.check_header(client_id, header)
        if duplicate is not None:
            return duplicate
        r = self._open_round(header.round)
        try:
            if isinstance(payload, SpooledPayload):
                _check_digest(header, payload.size, payload.finish())
            async with self._checks:  # each check holds a payload and its decoded state in memory
                digest = await asyncio.to_thread(self._check_and_store, header, payload, r)
        except UpdateRejected as err:
            self.reject(client_id, r.round, str(err))
            raise
        except OSError as err:
            if is_disk_full(err):
                raise disk_full_error(err) from None
            raise
        plan = r.plans.get(client_id)
        transfers = self._engine.transfers
        down_seconds = transfers.observe_downloads(client_id, header.downloads)
        transfers.observe_upload(client_id, plan.upload if plan is not None else Encoding(), bytes_up, up_seconds)
        update = UpdateRecord(
            idempotency_key=header.idempotency_key,
            round=r.round,
            attempt=r.attempt,
            client_id=client_id,
            task_id=header.task_id,
            payload_sha256=digest,
            num_examples=header.num_examples,
            label_counts=header.label_counts,
            train_seconds=header.train_seconds,
            bytes_up=bytes_up,
            metrics={
                **header.metrics,
                WIRE_DOWN_SECONDS: round(down_seconds, 4),
                WIRE_UP_SECONDS: round(up_seconds, 4),
            },
            received_ms=now_ms(),
        )
        earlier = await self._reserve(r, update)
        if earlier is not None:
            return earlier
        try:
            await self._store.add_update(update)
        except BaseException as err:
            r.pending.pop(client_id).set_result(None)
            if is_disk_full(err):
                raise disk_full_error(err) from None
            raise
        r.pending.pop(client_id).set_result(update)
        r.accepted[client_id] = update
        r.rejected.pop(client_id, None)  # a corrected retry within the round replaces a rejection
        # One line per round says how many were accepted; one per update is for debugging.
        _LOGGER.debug("[Fleet.UploadUpdate] round %d: accepted update from %s (%d bytes)", r.round, client_id, bytes_up)
        self._bus.emit(
            Event("accepted", r.round, client_id, cohort_size=len(r.cohort), updates_received=len(r.accepted))
        )
        self._changed.notify()
        return UploadResult(r.round, False, bytes_up)

    async def _reserve(self, r: OpenRound, update: UpdateRecord) -> UploadResult | None:
        """Claims the client's place in the round for this update (no await between the checks and the
        claim); returns the acknowledgement of an identical upload that got there first."""
        client_id = update.client_id
        if r.closed or self._engine.open_round is not r:
            raise errors.FailedPrecondition(f"round {r.round} closed while the update was being checked")
        racing = r.pending.get(client_id)
        if racing is not None:  # a concurrent retry of the same upload is being written
            racer = await asyncio.shield(racing)
            if racer is None:
                raise errors.Unavailable(f"a concurrent upload of {client_id} failed to be stored; retry")
            if racer.idempotency_key == update.idempotency_key:
                return UploadResult(r.round, True, racer.bytes_up)
            raise errors.FailedPrecondition(f"{client_id} already delivered an update for round {r.round}")
        earlier = r.accepted.get(client_id)
        if earlier is not None:
            if earlier.idempotency_key == update.idempotency_key:
                return UploadResult(r.round, True, earlier.bytes_up)
            raise errors.FailedPrecondition(f"{client_id} already delivered an update for round {r.round}")
        r.pending[client_id] = asyncio.get_running_loop().create_future()
        return None

    def _check_and_store(self, header: UploadHeader, received: bytes | SpooledPayload, r: OpenRound) -> str:
        """Validation and the durable payload in one trip to a worker thread; returns its blob id."""
        if isinstance(received, SpooledPayload):
            payload = received.read()
        else:
            payload = received
            _check_digest(header, len(payload), hashlib.sha256(payload).hexdigest())
        return self._engine.blobs.put(self._checked_payload(header, payload, r))

    def _checked_payload(self, header: UploadHeader, payload: bytes, r: OpenRound) -> bytes:
        """The checked update (its digest already matched) as the bytes to store: a whole fp32
        state (deltas applied). Blocking."""
        spec, n_classes = self._engine.model.spec, self._engine.model.n_classes
        validate_counts(header.num_examples, header.label_counts, n_classes, r.plan.max_trained_examples)
        validate_report(header.metrics, header.train_seconds)
        if len(header.downloads) > MAX_DOWNLOAD_TIMINGS or not all(d.valid() for d in header.downloads):
            raise UpdateRejected(
                f"downloads: at most {MAX_DOWNLOAD_TIMINGS} timings, each with 0 <= "
                "first_chunk_seconds <= seconds <= 86400 and first_chunk_bytes <= wire_bytes"
            )
        try:
            bundle = bundle_from_bytes(payload)
            state = decode_state(bundle)
            if bundle.base_sha256:
                bases = r.variants.model_bases() | {p.model.sha256 for p in r.plans.values()}
                if bundle.base_sha256 not in bases:
                    raise UpdateRejected(
                        f"update is a difference against {bundle.base_sha256[:16]!r}, which is "
                        f"not round {r.round}'s global model"
                    )
                validate_state(state, spec)
                state = apply_delta(self._engine.load_state(r.model_sha256), state)
        except CodecError as err:
            raise UpdateRejected(str(err)) from None
        validate_state(state, spec)
        return payload if not bundle.base_sha256 else state_bytes(state)

    def reject(self, client_id: str, round_: int, reason: str) -> None:
        """Counts a rejected update in the round's ledger; the round goes on with everyone else."""
        _LOGGER.warning("round %d: rejected update from %s: %s", round_, client_id, reason)
        r = self._engine.open_round
        if r is not None and r.round == round_ and client_id in r.cohort and client_id not in r.accepted:
            r.rejected[client_id] = reason
        self._bus.emit(Event("rejected", round_, client_id, message=reason))
        self._changed.notify()

    # -------------------------------------------------------------- declines
    def decline(self, client_id: str, round_: int, task_id: str, kind: str, detail: str) -> None:
        """A sampled client turns its task down; for memory, it is not sampled for this kind of task again."""
        if self._engine.recovering:
            raise errors.Recovering()
        r = self._engine.open_round
        if r is None or r.closed or r.round != round_ or r.cohort.get(client_id) != task_id:
            raise errors.FailedPrecondition(f"task {task_id!r} of round {round_} is not open for {client_id}")
        if client_id in r.accepted or client_id in r.pending:
            raise errors.FailedPrecondition(f"{client_id} already delivered an update for round {round_}")
        detail = (detail or "no detail given")[:300]
        reason = f"{kind}: {detail}"
        r.declined[client_id] = reason
        if kind == "memory":
            self._registry.decline_kind(client_id, self._engine.task_kind(), detail)
        _LOGGER.warning("round %d: %s declined its task (%s)", round_, client_id, reason)
        self._bus.emit(Event("rejected", round_, client_id, message=f"declined: {reason}"))
        self._changed.notify()
