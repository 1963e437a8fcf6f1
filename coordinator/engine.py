"""The round engine: recover, open, wait, aggregate, evaluate, commit; until the last round or Stop.

It runs on the server's asyncio loop and does its CPU work (encoding, aggregation, evaluation) and
its blocking I/O in worker threads, so RPCs keep flowing. It names no algorithm: the strategy
brings its parameters, artifacts and metrics, the model contract its spec and its evaluation.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Literal

from fedgen.coordinator.config import CoordinatorConfig
from fedgen.coordinator.events import ChangeSignal, Event, EventBus, PollWakers, now_ms
from fedgen.coordinator.ledger import ENGINE_EXTRAS, LedgerFiles, LedgerRow, RoundTally, build_ledger_row
from fedgen.coordinator.model import ModelContract
from fedgen.coordinator.records import ArtifactRecord
from fedgen.coordinator.registry import ClientRegistry
from fedgen.coordinator.robust import first_non_finite
from fedgen.coordinator.rounds import OpenRound
from fedgen.coordinator.store import BlobCorrupt, BlobStore, StateStore, is_disk_full
from fedgen.coordinator.strategy import Aggregate, ClientResult, Strategy
from fedgen.coordinator.transfers import RoundVariants, TransferPlanner
from fedgen.core.memory import trim_heap
from fedgen.core.task import TaskIdentity
from fedgen.export.codec import (
    CodecError,
    Encoding,
    State,
    bundle_from_bytes,
    bundle_to_bytes,
    decode_state,
    encode_state,
)

_LOGGER = logging.getLogger(__name__)

FederationStateName = Literal["waiting_for_clients", "training", "paused", "finished"]
#: Longest the engine sleeps without looking at the clock (deadlines, heartbeat horizons).
TICK_S = 1.0
#: How long the engine waits before retrying a write that met a full disk.
DISK_FULL_PAUSE_S = 2.0


class TaskMismatch(ValueError):
    """The state folder holds a federation of another task (or another version of it)."""


@dataclass(frozen=True)
class FederationStatus:
    federation_id: str
    state: FederationStateName
    current_round: int
    total_rounds: int
    connected_clients: int
    eligible_clients: int
    cohort_size: int
    updates_received: int
    strategy: str
    last_accuracy: float
    task: TaskIdentity


class RoundEngine:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: StateStore,
        blobs: BlobStore,
        strategy: Strategy,
        model: ModelContract,
        registry: ClientRegistry,
        transfers: TransferPlanner,
        bus: EventBus,
        changed: ChangeSignal,
        wakers: PollWakers,
    ) -> None:
        self.config = config
        self.store = store
        self.blobs = blobs
        self.strategy = strategy
        self.model = model
        self.registry = registry
        self.transfers = transfers
        self.bus = bus
        self.changed = changed
        self.wakers = wakers
        self.ledger_files = LedgerFiles(config.state_path, (*ENGINE_EXTRAS, *strategy.metric_names()))
        self.federation_id = ""
        self.current_round = 0
        self.global_model_sha = ""
        # Set when the global model had to be recovered: the round it came from (-1 = initial model).
        self._recovered_from: float | None = None
        self._strategy_state_reset = False
        self.last_accuracy = math.nan
        self.last_loss = math.nan
        self.open_round: OpenRound | None = None
        self.paused = False
        self.finished = False
        self._stop_requested = False
        self.recovered = asyncio.Event()

    # ----------------------------------------------------------------- state
    async def load(self) -> None:
        """Reads the federation from the store (a new one is created): fast, before the port opens."""
        s = self.store
        self.federation_id = await s.get_meta("federation_id") or uuid.uuid4().hex[:12]
        self.current_round = int(await s.get_meta("current_round") or 0)
        model_sha = await s.get_meta("global_model")
        task = json.dumps(asdict(self.model.identity), sort_keys=True)
        if model_sha is None:
            initial = await asyncio.to_thread(self.model.initial_state, self.config.federation.seed)
            model_sha = await asyncio.to_thread(self.blobs.put, state_bytes(initial))
            await s.set_meta(
                {
                    "federation_id": self.federation_id,
                    "current_round": "0",
                    "global_model": model_sha,
                    "task": task,
                    "task_source": self.config.task.name,  # how `fedgen export` finds the task again
                }
            )
            _LOGGER.info("new federation %s of task %s", self.federation_id, self.model.identity.describe())
        else:
            await self._check_task(await s.get_meta("task"), model_sha, task)
            _LOGGER.info("resuming federation %s at round %d", self.federation_id, self.current_round)
        self.global_model_sha = model_sha
        strategy_state = await s.get_meta("strategy_state")
        if strategy_state is not None:
            await self._load_strategy_state(strategy_state)
        rows = await s.ledger(max(0, self.current_round - 1))
        if rows:
            self.last_accuracy, self.last_loss = rows[-1].test_accuracy, rows[-1].test_loss
        self.finished = self.current_round >= self.config.federation.rounds

    async def _load_strategy_state(self, digest: str) -> None:
        """The server side's own state (FedGen's generator and its optimizer). When its blob is
        corrupt or gone, the strategy starts afresh from its seeded state (the generator is
        retrained from the next round), the log says so and the next ledger row carries extra
        strategy_state_reset = 1: a lost blob costs the generator's progress, never a crash loop."""
        try:
            data = await asyncio.to_thread(self.blobs.get, digest)
            await asyncio.to_thread(self.strategy.load_state_bytes, data)
            return
        except (OSError, CodecError, KeyError, ValueError, RuntimeError) as err:  # unreadable, or not this strategy's
            why: BaseException = err
        if isinstance(why, BlobCorrupt):
            await asyncio.to_thread(self.blobs.quarantine, digest)
        _LOGGER.error("the strategy's state %s cannot be read (%s): it starts afresh", digest[:12], why)
        self._strategy_state_reset = True

    async def _check_task(self, stored: str | None, model_sha: str, task: str) -> None:
        """A state folder holds one task's federation: another task is refused before anything runs."""
        if stored is None:  # written before tasks were recorded: it holds the task if its model fits the spec
            state = await asyncio.to_thread(self.load_state, model_sha)
            if {k: (v.shape, v.dtype) for k, v in state.items()} != dict(self.model.spec):
                raise TaskMismatch(
                    f"{self.config.state_path} holds a federation whose model does not fit task "
                    f"{self.model.identity.describe()}: use another state_dir"
                )
            await self.store.set_meta({"task": task, "task_source": self.config.task.name})
            return
        if stored != task:
            theirs = TaskIdentity(**json.loads(stored))
            raise TaskMismatch(
                f"{self.config.state_path} holds a federation of task {theirs.describe()}, but this coordinator is "
                f"configured for {self.model.identity.describe()}: use another state_dir, or the task it was made with"
            )

    @property
    def recovering(self) -> bool:
        return not self.recovered.is_set()

    def load_state(self, sha: str) -> State:
        """A stored model or update (blocking)."""
        return decode_state(bundle_from_bytes(self.blobs.get(sha)))

    def task_kind(self) -> str:
        """What a memory decline is about: the strategy and the shape of local training."""
        return f"{self.strategy.name}/batch{self.config.training.batch_size}"

    # ----------------------------------------------------------------- rounds
    async def run(self) -> None:
        """The federation: recover, then open, wait, aggregate, commit; until the last round or Stop."""
        await self._recover()
        fed = self.config.federation
        while not self.finished:
            if self._stop_requested or self.current_round >= fed.rounds:
                await self._finish("stopped by operator" if self._stop_requested else "all rounds done")
                break
            eligible = self.registry.eligible(self.task_kind())
            if self.paused or len(eligible) < fed.required_clients:
                await self.changed.wait(TICK_S)
                continue
            if not await self._until_written(functools.partial(self._open, eligible), "opening a round"):
                continue
            await self._run_open_round()

    async def _until_written(self, step: Callable[[], Awaitable[None]], what: str) -> bool:
        """Runs a step that writes state; on a full disk the engine pauses and retries it (every write
        is a transaction or a create-only blob, so a failed attempt left nothing half done) instead of
        exiting. False when a Stop came while it waited."""
        while True:
            try:
                await step()
                return True
            except OSError as err:
                if not is_disk_full(err):
                    raise
                _LOGGER.error("%s: the disk is full (%s); retrying in %g s", what, err, DISK_FULL_PAUSE_S)
                await asyncio.sleep(DISK_FULL_PAUSE_S)
                if self._stop_requested:
                    return False

    async def _recover(self) -> None:
        """Reopens a round a crash left open, with the updates acknowledged before it."""
        for stored in await self.store.open_rounds():
            if stored.round != self.current_round:
                await self.store.fail_round(stored.round, stored.attempt)
                continue
            deadline = max(stored.deadline_ms, now_ms() + int(self.config.federation.round_timeout_s * 1000))
            try:
                variants = await self._prepare_variants(stored.model_sha256, stored.artifacts)
            except (OSError, CodecError) as err:
                await self._abandon_unreadable(stored.round, stored.attempt, err)
                continue
            r = OpenRound(
                stored.round,
                stored.attempt,
                stored.cohort,
                stored.model_sha256,
                stored.opened_ms,
                deadline,
                self.strategy.configure_round(stored.round),
                stored.artifacts,
                variants,
            )
            for u in await self.store.updates_for(stored.round, stored.attempt):
                r.accepted[u.client_id] = u
            await self.store.set_round_deadline(r.round, r.attempt, deadline)
            self.open_round = r
            self.wakers.wake(r.cohort)
            _LOGGER.info("recovered round %d with %d acknowledged update(s)", r.round, len(r.accepted))
        rows = await self.store.ledger()
        await asyncio.to_thread(self.ledger_files.rewrite, rows)  # mends a crash between a commit and its append
        self.recovered.set()
        self.changed.notify()
        if self.open_round is not None:
            await self._run_open_round()

    async def _abandon_unreadable(self, round_: int, attempt: int, err: BaseException) -> None:
        """A round left open whose model or artifacts can no longer be read is not reopened (that was
        a crash loop): the attempt fails, and the next attempt opens on the newest readable model
        (`_readable_global_model`) with the updates this one acknowledged carried over."""
        acknowledged = len(await self.store.updates_for(round_, attempt))
        _LOGGER.error(
            "round %d attempt %d cannot be reopened, its model or artifacts cannot be read (%s): it is "
            "opened again, with its %d acknowledged update(s) carried over",
            round_,
            attempt,
            err,
            acknowledged,
        )
        await self.store.fail_round(round_, attempt)

    async def _prepare_variants(self, model_sha: str, artifacts: tuple[ArtifactRecord, ...]) -> RoundVariants:
        return await asyncio.to_thread(self.transfers.prepare, model_sha, artifacts)

    async def _readable_global_model(self) -> None:
        """The global model's blob is verified before a round is built on it. When it is corrupt or
        gone, the federation goes on from the newest model it can still read (the ledger's committed
        models, newest first, then the task's seeded initial model), says so in the log and in the
        next ledger row (extra global_model_recovered_from_round, -1 = the initial model), and
        quarantines the bad file: a lost blob costs rounds of progress, never a crash loop."""
        try:
            await asyncio.to_thread(self.blobs.get, self.global_model_sha)
            return
        except (OSError, CodecError) as err:
            lost, why = self.global_model_sha, err
        if isinstance(why, BlobCorrupt):
            await asyncio.to_thread(self.blobs.quarantine, lost)
        recovered_from, model_sha = -1, None
        for row in reversed(await self.store.ledger()):
            if row.model_sha256 and row.model_sha256 != lost and self.blobs.has(row.model_sha256):
                try:
                    await asyncio.to_thread(self.blobs.get, row.model_sha256)
                except (OSError, CodecError):
                    continue
                recovered_from, model_sha = row.round, row.model_sha256
                break
        if model_sha is None:
            initial = await asyncio.to_thread(self.model.initial_state, self.config.federation.seed)
            model_sha = await asyncio.to_thread(self.blobs.put, state_bytes(initial))
        _LOGGER.error(
            "the global model %s cannot be read (%s): going on from %s",
            lost[:12],
            why,
            "the task's initial model" if recovered_from < 0 else f"the model committed in round {recovered_from}",
        )
        await self.store.set_meta({"global_model": model_sha})
        self.global_model_sha = model_sha
        self._recovered_from = float(recovered_from)

    async def _open(self, eligible: list[str]) -> None:
        fed = self.config.federation
        round_ = self.current_round
        await self._readable_global_model()
        attempt = await self.store.max_attempt(round_) + 1
        rng = random.Random(f"{fed.seed}:{round_}:{attempt}")
        cohort = {
            cid: uuid.uuid4().hex for cid in sorted(rng.sample(eligible, min(fed.clients_per_round, len(eligible))))
        }
        skipped = {**self.registry.take_refused(), **self.registry.skipped(self.task_kind())}
        artifacts = []
        for artifact in await asyncio.to_thread(self.strategy.round_artifacts, round_):
            digest = await asyncio.to_thread(self.blobs.put, artifact.data)
            artifacts.append(ArtifactRecord(artifact.kind, digest, len(artifact.data)))
        t0 = time.monotonic()
        variants = await self._prepare_variants(self.global_model_sha, tuple(artifacts))
        encode_s = time.monotonic() - t0
        opened = now_ms()
        r = OpenRound(
            round_,
            attempt,
            cohort,
            self.global_model_sha,
            opened,
            opened + int(fed.round_timeout_s * 1000),
            self.strategy.configure_round(round_),
            tuple(artifacts),
            variants,
            encode_seconds=encode_s,
            skipped=skipped,
        )
        await self.store.open_round(r.record())
        self.open_round = r
        _LOGGER.info("round %d (attempt %d) opened with cohort %s", round_, attempt, sorted(cohort))
        self.bus.emit(
            Event(
                "opened", round_, cohort_size=len(cohort), eligible=len(eligible), connected=self.registry.connected()
            )
        )
        self.wakers.wake(cohort)
        self.changed.notify()

    async def _run_open_round(self) -> None:
        r = self.open_round
        assert r is not None
        while not r.all_in and now_ms() < r.deadline_ms:
            await self.changed.wait(min(TICK_S, max(0.01, (r.deadline_ms - now_ms()) / 1000)))
        await r.close()  # uploads between their last check and their record finish first
        self.changed.notify()
        carried = await self._carry_earlier_attempts(r)
        wait_s = (now_ms() - r.opened_ms) / 1000
        needed = self.config.federation.min_completed
        if len(r.accepted) < needed:
            await self.store.fail_round(r.round, r.attempt)
            msg = f"only {len(r.accepted)} update(s) by the deadline, {needed} needed"
            _LOGGER.warning("round %d attempt %d failed: %s", r.round, r.attempt, msg)
            self.bus.emit(
                Event("failed", r.round, message=msg, cohort_size=len(r.cohort), updates_received=len(r.accepted))
            )
            self.open_round = None
            return
        await self._until_written(lambda: self._commit(r, wait_s, carried), f"committing round {r.round}")

    async def _carry_earlier_attempts(self, r: OpenRound) -> int:
        """An update acknowledged in an earlier attempt of this round (one that failed for want of
        updates) counts in this one, unless its client delivered again: it was trained on the same
        global model, and an acknowledgement is a promise. Its client joins the row as completed,
        and the row's extra ``carried_from_failed_attempts`` says how many came this way."""
        carried = 0
        for attempt in range(r.attempt - 1, -1, -1):  # the newest earlier attempt first
            for u in await self.store.updates_for(r.round, attempt):
                if u.client_id in r.accepted or u.client_id in r.rejected or u.client_id in r.declined:
                    continue
                r.accepted[u.client_id] = u
                r.cohort.setdefault(u.client_id, u.task_id)
                carried += 1
        if carried:
            _LOGGER.info("round %d: %d update(s) acknowledged in earlier attempts count here", r.round, carried)
        return carried

    def _client_results(self, r: OpenRound) -> list[ClientResult]:
        """The round's acknowledged updates, read back and verified. One that can no longer be read
        (its file corrupt or gone) is quarantined and moved to the round's rejected with the reason:
        reported in the ledger, never silently dropped, and never a crash at every restart."""
        results = []
        for u in sorted(r.accepted.values(), key=lambda u: u.client_id):
            try:
                state = self.load_state(u.payload_sha256)
            except (OSError, CodecError) as err:
                where = self.blobs.quarantine(u.payload_sha256) if isinstance(err, BlobCorrupt) else None
                reason = (
                    f"acknowledged, but its stored update {u.payload_sha256[:12]} could not be read at commit "
                    f"({err.strerror if isinstance(err, OSError) and err.strerror else err})"
                    + (f"; quarantined as {where}" if where else "")
                )
                _LOGGER.error("round %d: %s: %s", r.round, u.client_id, reason)
                del r.accepted[u.client_id]
                r.rejected[u.client_id] = reason
                continue
            results.append(ClientResult(u.client_id, state, u.num_examples, u.label_counts, u.metrics))
        return results

    async def _commit(self, r: OpenRound, wait_s: float, carried: int = 0) -> None:
        t0 = time.monotonic()
        global_state = await asyncio.to_thread(self.load_state, r.model_sha256)
        acknowledged = len(r.accepted)
        results = await asyncio.to_thread(self._client_results, r)
        if results:
            aggregate = await asyncio.to_thread(self.strategy.aggregate_round, r.round, results, global_state)
            extras = dict(aggregate.extras)
            kept = self._non_finite(aggregate.state)
        else:  # every acknowledged update was unreadable: nothing to aggregate, the model stays
            aggregate = Aggregate(global_state)
            extras = {}
            kept = ("unreadable_updates", "no acknowledged update of the round could be read back")
        if acknowledged > len(results):
            extras["unreadable_updates"] = float(acknowledged - len(results))
        if self._recovered_from is not None:
            extras["global_model_recovered_from_round"] = self._recovered_from
        if self._strategy_state_reset:
            extras["strategy_state_reset"] = 1.0
        if carried:
            extras["carried_from_failed_attempts"] = float(carried)
        model_sha = r.model_sha256
        if kept is None:
            model_sha = await asyncio.to_thread(lambda: self.blobs.put(state_bytes(aggregate.state)))
        aggregate_s = time.monotonic() - t0
        t1 = time.monotonic()
        accuracy, loss = math.nan, math.nan
        last = r.round + 1 >= self.config.federation.rounds
        evaluate = self.model.evaluate
        if kept is None and evaluate is not None and ((r.round + 1) % self.config.data.evaluate_every == 0 or last):
            result = await asyncio.to_thread(evaluate, aggregate.state)
            accuracy, loss = result.accuracy, result.loss
            kept = self._accuracy_drop(accuracy)
            if kept is not None:
                extras["candidate_test_accuracy"] = accuracy
                model_sha = r.model_sha256
        evaluate_s = time.monotonic() - t1
        if kept is not None:  # the previous global model stays, and so do its figures
            extras[f"global_model_kept_{kept[0]}"] = 1.0
            accuracy, loss = self.last_accuracy, self.last_loss
            _LOGGER.warning("round %d: the previous global model stays (%s)", r.round, kept[1])
        bandwidth = self.config.bandwidth
        row = build_ledger_row(
            RoundTally(
                round=r.round,
                attempt=r.attempt,
                strategy=self.strategy.name,
                cohort=list(r.cohort),
                accepted=r.accepted,
                rejected=r.rejected,
                declined=r.declined,
                skipped=r.skipped,
                bytes_down=r.bytes_down,
                bytes_up=r.bytes_up,
                transfers=r.transfers(),
                opened_ms=r.opened_ms,
                committed_ms=now_ms(),
                wait_seconds=wait_s,
                aggregate_seconds=aggregate_s,
                evaluate_seconds=evaluate_s,
                test_accuracy=accuracy,
                test_loss=loss,
                strategy_extras=extras,
                encode_seconds=r.encode_seconds,
                encoding_policy=bandwidth.policy,
                transfer_budget_seconds=bandwidth.transfer_budget_s if self.transfers.adaptive else 0.0,
                model_sha256=model_sha,
            )
        )
        meta = {"current_round": str(r.round + 1), "global_model": model_sha}
        strategy_state = await asyncio.to_thread(self.strategy.state_bytes)
        if strategy_state is not None:
            meta["strategy_state"] = await asyncio.to_thread(self.blobs.put, strategy_state)
        await self.store.commit_round(r.round, r.attempt, row, meta)
        self.global_model_sha = model_sha
        self._recovered_from = None
        self._strategy_state_reset = False
        self.current_round = r.round + 1
        if not math.isnan(accuracy):
            self.last_accuracy, self.last_loss = accuracy, loss
        self.open_round = None
        await self._append_ledger(row)
        await self._prune_updates(r.round)
        _LOGGER.info(
            "round %d committed: %d/%d updates, accuracy %.4f, %d B down, %d B up",
            r.round,
            row.completed,
            row.cohort_size,
            accuracy,
            row.bytes_down,
            row.bytes_up,
        )
        self.bus.emit(
            Event("committed", r.round, cohort_size=len(r.cohort), updates_received=len(r.accepted), ledger_row=row)
        )
        self.changed.notify()
        trim_heap()  # the round's evaluation and uploads are freed: without this RSS drifts up with rounds

    async def _prune_updates(self, committed: int) -> None:
        """Retention: deletes the updates of the round that just fell out of the kept window. A blob
        that is also a committed model (a client that sent the model back unchanged) stays."""
        keep = self.config.retention.keep_update_rounds
        old = committed - keep
        if keep == 0 or old < 0:
            return
        rows = await self.store.ledger()
        protected = {r.model_sha256 for r in rows} | {self.global_model_sha}
        digests = set()
        for attempt in range(await self.store.max_attempt(old) + 1):  # attempts count from 0
            digests |= {u.payload_sha256 for u in await self.store.updates_for(old, attempt)}
        removed = 0
        for digest in sorted(digests - protected):
            removed += await asyncio.to_thread(self.blobs.delete, digest)
        if removed:
            _LOGGER.info("retention: removed %d update(s) of round %d", removed, old)

    @staticmethod
    def _non_finite(state: State) -> tuple[str, str] | None:
        bad = first_non_finite(state)
        return None if bad is None else ("non_finite", f"tensor {bad!r} of the aggregate is not finite")

    def _accuracy_drop(self, accuracy: float) -> tuple[str, str] | None:
        """A new model that scores far below the one it would replace is not committed (opt-in)."""
        drop = self.config.robust.max_accuracy_drop
        if drop is None or math.isnan(self.last_accuracy) or not accuracy < self.last_accuracy - drop:
            return None
        return "accuracy_drop", (
            f"its test accuracy {accuracy:.4f} is more than robust.max_accuracy_drop = {drop} below "
            f"the current model's {self.last_accuracy:.4f}"
        )

    async def _append_ledger(self, row: LedgerRow) -> None:
        if not await asyncio.to_thread(self.ledger_files.append, row):
            rows = await self.store.ledger()
            await asyncio.to_thread(self.ledger_files.rewrite, rows)

    async def _finish(self, reason: str) -> None:
        self.finished = True
        _LOGGER.info("federation %s finished: %s", self.federation_id, reason)
        self.bus.emit(Event("finished", self.current_round, message=reason))
        self.wakers.wake()
        self.changed.notify()

    # --------------------------------------------------------------- control
    def pause(self) -> None:
        self.paused = True
        self.changed.notify()

    def resume(self) -> None:
        self.paused = False
        self.changed.notify()

    def stop(self) -> None:
        self._stop_requested = True
        self.changed.notify()

    def status(self) -> FederationStatus:
        r = self.open_round
        state: FederationStateName
        if self.finished:
            state = "finished"
        elif self.paused:
            state = "paused"
        elif r is None:
            state = "waiting_for_clients"
        else:
            state = "training"
        return FederationStatus(
            federation_id=self.federation_id,
            state=state,
            current_round=self.current_round,
            total_rounds=self.config.federation.rounds,
            connected_clients=self.registry.connected(),
            eligible_clients=len(self.registry.eligible(self.task_kind())),
            cohort_size=len(r.cohort) if r else 0,
            updates_received=len(r.accepted) if r else 0,
            strategy=self.strategy.name,
            last_accuracy=self.last_accuracy,
            task=self.model.identity,
        )

    # ------------------------------------------------------------- accounting
    def record_download(self, client_id: str, nbytes: int) -> None:
        """Bytes of a message the coordinator sent a client of the open round's cohort."""
        r = self.open_round
        if r is not None and client_id in r.cohort:
            r.bytes_down[client_id] += nbytes

    def record_upload(self, client_id: str, nbytes: int) -> None:
        """Bytes of a request a cohort client sent besides its update (task poll, download requests,
        heartbeats): the update itself is counted with it, once, when it is accepted."""
        r = self.open_round
        if r is not None and client_id in r.cohort:
            r.bytes_up[client_id] += nbytes

    def describe_artifact(self, client_id: str, artifact_id: str) -> tuple[str, str]:
        """(kind, encoding) of an artifact a client downloads, for metrics: from its plan for the
        open round; ("model", "fp32") for the global model outside one; ("other", "") otherwise."""
        r = self.open_round
        plan = r.plans.get(client_id) if r is not None else None
        if plan is not None:
            if plan.model.sha256 == artifact_id:
                return "model", plan.model.name
            for kind, variant in plan.artifacts.items():
                if variant.sha256 == artifact_id:
                    return kind, variant.name
        if artifact_id == self.global_model_sha:
            return "model", "fp32"
        return "other", ""

    def upload_encoding(self, client_id: str) -> str:
        """The encoding a client's update travels in this round (its plan's), for metrics."""
        r = self.open_round
        plan = r.plans.get(client_id) if r is not None else None
        return plan.upload.name if plan is not None else "fp32"

    def is_published(self, artifact_id: str) -> bool:
        """Whether clients may download it: the global model and the open round's artifacts."""
        r = self.open_round
        return artifact_id == self.global_model_sha or (r is not None and artifact_id in r.published)


def state_bytes(state: State) -> bytes:
    """A whole model as the store keeps it: an fp32 TensorBundle."""
    return bundle_to_bytes(encode_state(state, Encoding()))
