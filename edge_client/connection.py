"""The edge client's link to the coordinator: deadlines, retries, resumable transfers.

Every call has a deadline. Refusals that mean "try later" are retried as `fedgen.core.retry`
decides (exponential backoff with full jitter, the server's pushback as a floor); anything else
surfaces as `FleetCallError` with the coordinator's message. Every call may be retried: polls and
heartbeats are harmless, downloads resume from the bytes already on disk, uploads carry an
idempotency key so the coordinator counts them once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from fedgen.core.retry import RetryPolicy
from fedgen.core.transport import DEFAULT_CHUNK_BYTES, bearer_metadata, channel_options, wire_bytes
from fedgen.v1 import fleet_pb2, fleet_pb2_grpc

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")
__all__ = ["FleetCallError", "FleetConnection", "RetryPolicy", "TransferStats"]


class FleetCallError(RuntimeError):
    """A call failed for a reason retrying cannot fix; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class TransferStats:
    """Bytes and seconds on the wire as this client saw them (serialized messages + gRPC prefix)."""

    bytes_down: int = 0
    bytes_up: int = 0
    seconds_down: float = 0.0
    seconds_up: float = 0.0
    artifacts_from_cache: int = 0
    # Calls refused with "try later" and retried, by status code name.
    retries: Counter[str] = field(default_factory=Counter)


@dataclass
class FleetConnection:
    address: str
    call_timeout_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_message_bytes: int = 4 * 1024 * 1024
    credentials: grpc.ChannelCredentials | None = None
    seed: int | None = None
    # With TLS: check the server certificate against this name instead of the address's host.
    tls_server_name: str = ""
    # The device's readiness, asked before every PollTask and Heartbeat (None = always ready).
    device_state: Callable[[], fleet_pb2.DeviceState] | None = None

    def __post_init__(self) -> None:
        options = channel_options(self.max_message_bytes)
        if self.credentials and self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        self._channel = (
            grpc.secure_channel(self.address, self.credentials, options)
            if self.credentials
            else grpc.insecure_channel(self.address, options)
        )
        self._stub = fleet_pb2_grpc.FleetStub(self._channel)
        self._rng = random.Random(self.seed)
        self.client_id: str | None = None
        self._credential: str | None = None
        self.heartbeat_interval_s = 20.0
        self.stats = TransferStats()
        # This task's downloads as timed here: sent with the update so the coordinator learns
        # this device's link. The runner clears it per task.
        self.download_log: list[fleet_pb2.TransferTiming] = []

    def close(self) -> None:
        self._channel.close()

    # ------------------------------------------------------------ plumbing
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._credential is None:
            raise RuntimeError("not joined: call join() first")
        return bearer_metadata(self._credential)

    def _with_retry(self, what: str, call: Callable[[], T]) -> T:
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                code = err.code()
                details = err.details() or ""
                delay = self.retry.delay(err, attempt, self._rng)
                if delay is None or time.monotonic() - started > self.retry.give_up_after_s:
                    raise FleetCallError(code, details) from None
                self.stats.retries[code.name] += 1
                _LOGGER.warning("%s: %s (%s); retrying in %.2fs", what, code.name, details, delay)
                time.sleep(delay)
                attempt += 1

    # --------------------------------------------------------------- calls
    def join(
        self,
        enrollment_token: str,
        profile: fleet_pb2.DeviceProfile,
        client_id: str = "",
        task: fleet_pb2.TaskIdentity | None = None,
        previous_credential: str = "",
    ) -> str:
        """Joins (the task this client trains is declared, so the coordinator can refuse another).

        Rejoining an id needs the credential it was issued: the one this connection holds, or
        `previous_credential` (kept from an earlier process)."""
        if client_id and self._credential and self._credential.startswith(client_id + "."):
            previous_credential = self._credential
        request = fleet_pb2.JoinRequest(
            enrollment_token=enrollment_token,
            profile=profile,
            requested_client_id=client_id,
            task=task,
            previous_credential=previous_credential,
        )
        response = self._with_retry("Join", lambda: self._stub.Join(request, timeout=self.call_timeout_s))
        self.client_id = response.client_id
        self._credential = response.credential
        self.heartbeat_interval_s = max(1.0, response.heartbeat_interval_ms / 1000)
        _LOGGER.info("joined federation %s as %s", response.federation_id, response.client_id)
        return response.client_id

    @property
    def credential(self) -> str | None:
        return self._credential

    def poll(self, max_wait_s: float = 15.0, held_models: list[str] | None = None) -> fleet_pb2.Task:
        request = fleet_pb2.PollTaskRequest(
            max_wait_ms=int(max_wait_s * 1000), state=self._state(), held_models=held_models or []
        )
        try:
            task = self._with_retry(
                "PollTask",
                lambda: self._stub.PollTask(
                    request, timeout=max_wait_s + self.call_timeout_s, metadata=self._metadata()
                ),
            )
        except FleetCallError as err:
            if err.code == grpc.StatusCode.DEADLINE_EXCEEDED:  # a slow coordinator: just ask again
                return fleet_pb2.Task(wait=fleet_pb2.WaitTask(retry_after_ms=500, reason="poll timed out"))
            raise
        if task.HasField("train"):
            self.stats.bytes_down += wire_bytes(task.ByteSize())
        return task

    def _state(self) -> fleet_pb2.DeviceState:
        return self.device_state() if self.device_state is not None else fleet_pb2.DeviceState()

    def heartbeat(self, busy: bool) -> None:
        self._with_retry(
            "Heartbeat",
            lambda: self._stub.Heartbeat(
                fleet_pb2.HeartbeatRequest(busy=busy, state=self._state()),
                timeout=self.call_timeout_s,
                metadata=self._metadata(),
            ),
        )

    def decline(
        self,
        task: fleet_pb2.TrainTask,
        reason: fleet_pb2.DeclineReason.ValueType,
        detail: str,
        needed_mb: int = 0,
        budget_mb: int = 0,
    ) -> None:
        """Turns a task down and says why, so the round does not wait for this client."""
        self._with_retry(
            "DeclineTask",
            lambda: self._stub.DeclineTask(
                fleet_pb2.DeclineTaskRequest(
                    round=task.round,
                    task_id=task.task_id,
                    reason=reason,
                    detail=detail,
                    needed_memory_mb=needed_mb,
                    memory_budget_mb=budget_mb,
                ),
                timeout=self.call_timeout_s,
                metadata=self._metadata(),
            ),
        )

    def leave(self, reason: str) -> None:
        self._with_retry(
            "Leave",
            lambda: self._stub.Leave(
                fleet_pb2.LeaveRequest(reason=reason), timeout=self.call_timeout_s, metadata=self._metadata()
            ),
        )

    def fetch_artifact(self, ref: fleet_pb2.ArtifactRef, cache_dir: Path) -> Path:
        """The artifact's verified file in `cache_dir`, downloading only what is missing.

        Streams to `<id>.part` on disk (never the whole payload twice in memory) and
        resumes from its length after a cut; the digest is checked before use.
        """
        cache_dir.mkdir(parents=True, exist_ok=True)
        digest = ref.artifact_id.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise FleetCallError(grpc.StatusCode.INVALID_ARGUMENT, f"artifact id {ref.artifact_id!r} is not a sha256")
        final = cache_dir / digest
        if final.exists():
            self.stats.artifacts_from_cache += 1
            self.download_log.append(fleet_pb2.TransferTiming(artifact_id=digest))
            return final
        part = cache_dir / f"{digest}.part"
        started = time.monotonic()
        received = 0
        first: tuple[float, int] | None = None  # (seconds after the request, wire bytes) of the first chunk
        attempt = 0
        while True:
            offset = part.stat().st_size if part.exists() else 0
            try:
                with open(part, "ab") as f:
                    for chunk in self._stub.DownloadArtifact(
                        fleet_pb2.DownloadRequest(
                            artifact_id=digest, offset=offset, max_chunk_bytes=DEFAULT_CHUNK_BYTES
                        ),
                        timeout=self.call_timeout_s + ref.size_bytes / 50_000,
                        metadata=self._metadata(),
                    ):
                        if chunk.offset != offset:
                            raise FleetCallError(
                                grpc.StatusCode.DATA_LOSS, f"chunk at {chunk.offset}, expected {offset}"
                            )
                        f.write(chunk.data)
                        offset += len(chunk.data)
                        self.stats.bytes_down += wire_bytes(chunk.ByteSize())
                        received += wire_bytes(chunk.ByteSize())
                        if first is None:
                            first = (time.monotonic() - started, wire_bytes(chunk.ByteSize()))
                    f.flush()
                    os.fsync(f.fileno())
                break
            except grpc.RpcError as err:
                code = err.code()
                delay = self.retry.delay(err, attempt, self._rng)
                if delay is None or time.monotonic() - started > self.retry.give_up_after_s:
                    raise FleetCallError(code, err.details() or "") from None
                _LOGGER.warning(
                    "download of %s cut at byte %d (%s); resuming in %.2fs", digest[:12], offset, code.name, delay
                )
                time.sleep(delay)
                attempt += 1
        elapsed = time.monotonic() - started
        self.stats.seconds_down += elapsed
        first_s, first_bytes = first or (0.0, 0)
        self.download_log.append(
            fleet_pb2.TransferTiming(
                artifact_id=digest,
                wire_bytes=received,
                seconds=elapsed,
                first_chunk_seconds=first_s,
                first_chunk_bytes=first_bytes,
            )
        )
        if _file_sha256(part) != digest:
            part.unlink()
            raise FleetCallError(
                grpc.StatusCode.DATA_LOSS, f"artifact {digest[:12]} failed its digest check; discarded"
            )
        os.replace(part, final)
        return final

    def upload(
        self, header: fleet_pb2.UpdateHeader, payload: bytes, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> fleet_pb2.UploadAck:
        """Uploads header + payload chunks; retried uploads keep the header's idempotency key."""

        def messages() -> Iterator[fleet_pb2.UploadMessage]:
            yield fleet_pb2.UploadMessage(header=header)
            view = memoryview(payload)
            for start in range(0, len(payload), chunk_bytes):
                yield fleet_pb2.UploadMessage(chunk=bytes(view[start : start + chunk_bytes]))

        started = time.monotonic()
        ack = self._with_retry(
            "UploadUpdate",
            lambda: self._stub.UploadUpdate(
                messages(), timeout=self.call_timeout_s + len(payload) / 50_000, metadata=self._metadata()
            ),
        )
        self.stats.seconds_up += time.monotonic() - started
        self.stats.bytes_up += sum(wire_bytes(m.ByteSize()) for m in messages())
        return ack


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
