"""The federation as the servicers see it: one door in front of the concepts that run it.

``registry`` (who is in), ``board`` (what a poll answers), ``intake`` (what clients send back),
``engine`` (the rounds) and ``bus`` (what happened, for operators). The facade wires them
together and adds only what needs more than one of them. It knows nothing about gRPC: the
servicers translate its records and domain errors (``errors``) to and from the wire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from fedgen.coordinator import errors
from fedgen.coordinator.assignments import Assignment, TaskBoard
from fedgen.coordinator.config import CoordinatorConfig
from fedgen.coordinator.downloads import ArtifactServer
from fedgen.coordinator.engine import FederationStatus, RoundEngine
from fedgen.coordinator.events import ChangeSignal, Event, EventBus, PollWakers
from fedgen.coordinator.exports import ExportedModel, ModelChoice, export_chosen
from fedgen.coordinator.intake import UploadHeader, UploadIntake, UploadResult
from fedgen.coordinator.ledger import LedgerRow
from fedgen.coordinator.metrics import FederationMetrics
from fedgen.coordinator.model import ModelContract
from fedgen.coordinator.records import ClientProfile
from fedgen.coordinator.registry import ClientRegistry
from fedgen.coordinator.state_lock import StateDirLock
from fedgen.coordinator.store import BlobStore, StateStore
from fedgen.coordinator.strategy import Strategy
from fedgen.coordinator.transfers import TransferPlanner
from fedgen.coordinator.upload_spool import SpooledPayload, UploadSpool
from fedgen.core.task import TaskIdentity
from fedgen.export.codec import State
from fedgen.export.model_export import ExportFormat

_LOGGER = logging.getLogger(__name__)


class Federation:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: StateStore,
        blobs: BlobStore,
        strategy: Strategy,
        model: ModelContract,
        lock: StateDirLock | None = None,  # released at close: the state folder is ours until then
    ) -> None:
        self.config = config
        self._lock = lock
        self.store = store
        self.blobs = blobs
        self.bus = EventBus()
        self.metrics = FederationMetrics()
        self.bus.listen(self.metrics.observe)
        changed, wakers = ChangeSignal(), PollWakers()
        self.registry = ClientRegistry(store, config.auth, config.federation.heartbeat_timeout_s, model.identity)
        transfers = TransferPlanner(config.bandwidth, blobs, model.tensor_shapes(), strategy.artifact_specs())
        self.engine = RoundEngine(
            config, store, blobs, strategy, model, self.registry, transfers, self.bus, changed, wakers
        )
        self.board = TaskBoard(self.engine, self.registry, wakers)
        self.intake = UploadIntake(config.server, self.engine, store, self.registry, self.bus, changed)
        self.downloads = ArtifactServer(blobs, self.engine.is_published)
        self.spool = UploadSpool(config.state_path / "incoming")
        self._changed = changed

    async def load(self) -> None:
        """Reads clients and the federation's progress from the store (before the port opens)."""
        self.registry.load(await self.store.clients())
        await asyncio.to_thread(self.spool.clear)
        await self.engine.load()

    async def run(self) -> None:
        await self.engine.run()

    async def close(self) -> None:
        try:
            await self.store.close()
        finally:
            if self._lock is not None:
                self._lock.release()

    # --------------------------------------------------------------- views
    @property
    def federation_id(self) -> str:
        return self.engine.federation_id

    @property
    def current_round(self) -> int:
        return self.engine.current_round

    @property
    def task(self) -> TaskIdentity:
        return self.engine.model.identity

    @property
    def finished(self) -> bool:
        return self.engine.finished

    @property
    def recovering(self) -> bool:
        return self.engine.recovering

    async def wait_recovered(self) -> None:
        await self.engine.recovered.wait()

    def status(self) -> FederationStatus:
        return self.engine.status()

    async def ledger(self, from_round: int = 0) -> list[LedgerRow]:
        return await self.store.ledger(from_round)

    def load_state(self, sha: str) -> State:
        return self.engine.load_state(sha)

    async def export_model(self, choice: ModelChoice, fmt: ExportFormat) -> ExportedModel:
        """A committed global model as a deployable file (Control.ExportModel)."""
        task = self.engine.model.task
        if task is None:
            raise errors.FailedPrecondition("this coordinator was built without its task: it cannot export models")
        return await export_chosen(self.store, self.blobs, task, choice, fmt)

    def all_told_done(self) -> bool:
        """Whether every eligible client has heard DONE (so the server may exit)."""
        return set(self.registry.eligible(self.engine.task_kind())) <= self.board.told_done

    # ------------------------------------------------------------- clients
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
        client_id, credential = await self.registry.join(
            enrollment_token, profile, requested_id, task, peer, previous_credential, certified_id
        )
        self.engine.transfers.estimator.seed(client_id, float(profile.link_down_bps), float(profile.link_up_bps))
        self.bus.emit(Event("joined", self.engine.current_round, client_id=client_id))
        self._changed.notify()
        return client_id, credential

    def authenticate(self, credential: str | None) -> str:
        return self.registry.authenticate(credential)

    async def leave(self, client_id: str) -> None:
        await self.registry.leave(client_id)
        self._changed.notify()

    def update_state(self, client_id: str, not_ready: bool, reason: str) -> None:
        """The device's probes said whether it is willing to train (sent on PollTask and Heartbeat)."""
        if self.registry.set_readiness(client_id, not_ready, reason):
            self._changed.notify()

    # --------------------------------------------------------------- tasks
    async def poll(self, client_id: str, max_wait_s: float, held_models: Iterable[str] = ()) -> Assignment:
        return await self.board.poll(client_id, max_wait_s, held_models)

    def decline(self, client_id: str, round_: int, task_id: str, kind: str, detail: str) -> None:
        self.intake.decline(client_id, round_, task_id, kind, detail)

    async def artifact_bytes(self, artifact_id: str) -> bytes:
        return await self.downloads.get(artifact_id)

    def record_download(self, client_id: str, nbytes: int) -> None:
        self.engine.record_download(client_id, nbytes)

    def describe_artifact(self, client_id: str, artifact_id: str) -> tuple[str, str]:
        return self.engine.describe_artifact(client_id, artifact_id)

    def upload_encoding(self, client_id: str) -> str:
        return self.engine.upload_encoding(client_id)

    def record_upload(self, client_id: str, nbytes: int) -> None:
        self.engine.record_upload(client_id, nbytes)

    # ------------------------------------------------------------- uploads
    async def check_upload_header(self, client_id: str, header: UploadHeader) -> UploadResult | None:
        return await self.intake.check_header(client_id, header)

    async def accept_upload(
        self,
        client_id: str,
        header: UploadHeader,
        payload: bytes | SpooledPayload,
        bytes_up: int,
        up_seconds: float = 0.0,
    ) -> UploadResult:
        return await self.intake.accept(client_id, header, payload, bytes_up, up_seconds)

    def reject(self, client_id: str, round_: int, reason: str) -> None:
        self.intake.reject(client_id, round_, reason)

    # ------------------------------------------------------------- control
    def pause(self) -> None:
        self.engine.pause()

    def resume(self) -> None:
        self.engine.resume()

    def stop(self) -> None:
        self.engine.stop()

    def subscribe(self) -> asyncio.Queue[Event]:
        return self.bus.subscribe()

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self.bus.unsubscribe(queue)
