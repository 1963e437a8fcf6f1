"""Thin gRPC servicers: parse, authenticate, call the round engine, map errors to status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias, TypeVar

import grpc

from fedgen.coordinator import errors, wire
from fedgen.coordinator.auth import check_operator
from fedgen.coordinator.cert_identity import certified_client_id
from fedgen.coordinator.federation import Federation
from fedgen.coordinator.intake import UploadHeader, UploadResult, disk_full_error
from fedgen.coordinator.store import is_disk_full
from fedgen.coordinator.upload_budget import UploadBudget
from fedgen.core.transport import DEFAULT_CHUNK_BYTES, bearer_from_metadata, wire_bytes
from fedgen.v1 import control_pb2, control_pb2_grpc, fleet_pb2, fleet_pb2_grpc

_LOGGER = logging.getLogger(__name__)

#: Smallest download chunk the server sends, whatever the client asks for.
MIN_CHUNK_BYTES = 1024

_DECLINE_KINDS = {
    fleet_pb2.DECLINE_REASON_MEMORY: "memory",
    fleet_pb2.DECLINE_REASON_CONDITIONS: "conditions",
    fleet_pb2.DECLINE_REASON_ARTIFACT: "artifact",
}

F = TypeVar("F", bound=Callable[..., Any])
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _rpc_name(fn: Callable[..., Any]) -> str:
    return fn.__qualname__.replace("Servicer", "")


async def _abort(context: Context, name: str, err: errors.FederationError) -> None:
    _LOGGER.info("[%s] %s: %s", name, err.code.name, err)
    await context.abort(err.code, str(err), errors.trailers(err))


async def _internal(context: Context, name: str, err: Exception) -> None:
    _LOGGER.error("[%s] unexpected error", name, exc_info=err)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error in the coordinator (logged there)")


def unary_errors(fn: F) -> F:
    """Maps domain errors of a unary or client-streaming handler to gRPC status codes."""
    name = _rpc_name(fn)

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Context) -> Any:
        try:
            return await fn(self, request, context)
        except errors.FederationError as err:
            await _abort(context, name, err)
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # a bug: log it whole, tell the caller nothing about our internals
            await _internal(context, name, err)

    return wrapper  # type: ignore[return-value]


def stream_errors(fn: F) -> F:
    """Same for server-streaming handlers (async generators)."""
    name = _rpc_name(fn)

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: Context) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except errors.FederationError as err:
            await _abort(context, name, err)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _internal(context, name, err)

    return wrapper  # type: ignore[return-value]


class FleetServicer(fleet_pb2_grpc.FleetServicer):
    def __init__(
        self, federation: Federation, chunk_bytes: int = DEFAULT_CHUNK_BYTES, max_poll_wait_s: float = 20.0
    ) -> None:
        self.fed = federation
        self.chunk_bytes = chunk_bytes
        self.max_poll_wait_s = max_poll_wait_s
        server = federation.config.server
        self.upload_idle_s = server.upload_idle_s
        self.certified_ids = server.tls.client_id_from_certificate
        self.uploads = UploadBudget(server.max_upload_buffer_bytes)

    def _client(self, context: Context) -> str:
        return self.fed.authenticate(bearer_from_metadata(context.invocation_metadata()))

    @unary_errors
    async def Join(self, request: fleet_pb2.JoinRequest, context: Context) -> fleet_pb2.JoinResponse:
        task = wire.task_from_proto(request.task) if request.HasField("task") else None
        certified = certified_client_id(context.auth_context()) if self.certified_ids else None
        client_id, credential = await self.fed.join(
            request.enrollment_token,
            wire.profile_from_proto(request.profile),
            request.requested_client_id,
            task,
            context.peer(),
            request.previous_credential,
            certified,
        )
        interval_ms = int(self.fed.config.federation.heartbeat_timeout_s * 1000 / 3)
        return fleet_pb2.JoinResponse(
            client_id=client_id,
            credential=credential,
            heartbeat_interval_ms=interval_ms,
            federation_id=self.fed.federation_id,
            task=wire.task_to_proto(self.fed.task),
        )

    @unary_errors
    async def PollTask(self, request: fleet_pb2.PollTaskRequest, context: Context) -> fleet_pb2.Task:
        client_id = self._client(context)
        self.fed.update_state(client_id, request.state.not_ready, request.state.reason)
        wait_s = min(request.max_wait_ms / 1000, self.max_poll_wait_s)
        task = wire.assignment_to_proto(await self.fed.poll(client_id, wait_s, request.held_models))
        if task.HasField("train"):
            self.fed.record_upload(client_id, wire_bytes(request.ByteSize()))
            self.fed.record_download(client_id, wire_bytes(task.ByteSize()))
        return task

    @stream_errors
    async def DownloadArtifact(
        self, request: fleet_pb2.DownloadRequest, context: Context
    ) -> AsyncIterator[fleet_pb2.ArtifactChunk]:
        client_id = self._client(context)
        self.fed.record_upload(client_id, wire_bytes(request.ByteSize()))
        data = await self.fed.artifact_bytes(request.artifact_id)
        kind, encoding = self.fed.describe_artifact(client_id, request.artifact_id)
        if request.offset > len(data):
            raise errors.OutOfRange(f"offset {request.offset} is beyond the artifact's {len(data)} bytes")
        # A floor, so a 1-byte chunk request cannot make the server send one message per byte.
        chunk = max(MIN_CHUNK_BYTES, min(request.max_chunk_bytes or self.chunk_bytes, self.chunk_bytes))
        offset = request.offset
        while offset < len(data) or (offset == 0 and not data):
            msg = fleet_pb2.ArtifactChunk(
                artifact_id=request.artifact_id, offset=offset, data=data[offset : offset + chunk], total_size=len(data)
            )
            nbytes = wire_bytes(msg.ByteSize())
            self.fed.record_download(client_id, nbytes)
            self.fed.metrics.count_artifact("down", kind, encoding, nbytes)
            yield msg
            offset += chunk
            if not data:
                break

    @unary_errors
    async def UploadUpdate(
        self, request_iterator: AsyncIterator[fleet_pb2.UploadMessage], context: Context
    ) -> fleet_pb2.UploadAck:
        client_id = self._client(context)
        try:
            return await self._upload(client_id, request_iterator)
        except errors.FederationError as err:
            self.fed.metrics.updates_rejected.labels(err.code.name).inc()
            raise

    async def _upload(
        self, client_id: str, request_iterator: AsyncIterator[fleet_pb2.UploadMessage]
    ) -> fleet_pb2.UploadAck:
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise errors.InvalidArgument("upload stream is empty: send an UpdateHeader first") from None
        if not first.HasField("header"):
            raise errors.InvalidArgument("the first upload message must be an UpdateHeader")
        header = wire.upload_header_from_proto(first.header)
        duplicate = await self.fed.check_upload_header(client_id, header)
        if duplicate is not None:
            _LOGGER.info(
                "[Fleet.UploadUpdate] duplicate upload %s from %s acknowledged again", header.idempotency_key, client_id
            )
            return wire.upload_result_to_proto(duplicate)
        try:
            result = await self._receive_upload(client_id, header, first, stream)
        except OSError as err:  # the scratch file: a full disk is worth a retry, anything else is not
            if is_disk_full(err):
                raise disk_full_error(err) from None
            raise
        if not result.duplicate:
            self.fed.metrics.count_artifact("up", "update", self.fed.upload_encoding(client_id), result.received_bytes)
        ack = wire.upload_result_to_proto(result)
        self.fed.record_download(client_id, wire_bytes(ack.ByteSize()))
        return ack

    async def _receive_upload(
        self,
        client_id: str,
        header: UploadHeader,
        first: fleet_pb2.UploadMessage,
        stream: AsyncIterator[fleet_pb2.UploadMessage],
    ) -> UploadResult:
        """The payload's chunks, written to a scratch file as they arrive, then handed to intake."""
        with self.uploads.reserve(client_id, header.payload_bytes), self.fed.spool.receive() as payload:
            started = time.monotonic()  # the upload's time on the link: header to last chunk
            received = wire_bytes(first.ByteSize())
            while True:
                try:
                    msg = await asyncio.wait_for(stream.__anext__(), self.upload_idle_s)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise errors.DeadlineExceeded(
                        f"upload stalled: no message for {self.upload_idle_s:g} s (server.upload_idle_s); "
                        "send it again with the same idempotency key"
                    ) from None
                if not msg.HasField("chunk"):
                    raise errors.InvalidArgument("only payload chunks may follow the UpdateHeader")
                received += wire_bytes(msg.ByteSize())
                if payload.size + len(msg.chunk) > header.payload_bytes:
                    why = f"payload exceeds the declared payload_bytes ({header.payload_bytes})"
                    self.fed.reject(client_id, header.round, why)
                    raise errors.InvalidArgument(why)
                payload.write(msg.chunk)
            seconds = time.monotonic() - started
            return await self.fed.accept_upload(client_id, header, payload, received, seconds)

    @unary_errors
    async def Heartbeat(self, request: fleet_pb2.HeartbeatRequest, context: Context) -> fleet_pb2.HeartbeatResponse:
        client_id = self._client(context)
        self.fed.update_state(client_id, request.state.not_ready, request.state.reason)
        response = fleet_pb2.HeartbeatResponse(current_round=self.fed.current_round)
        self.fed.record_upload(client_id, wire_bytes(request.ByteSize()))
        self.fed.record_download(client_id, wire_bytes(response.ByteSize()))
        return response

    @unary_errors
    async def DeclineTask(
        self, request: fleet_pb2.DeclineTaskRequest, context: Context
    ) -> fleet_pb2.DeclineTaskResponse:
        client_id = self._client(context)
        if request.reason == fleet_pb2.DECLINE_REASON_MEMORY:
            detail = f"needs {request.needed_memory_mb} MiB, budget {request.memory_budget_mb} MiB"
            if request.detail:
                detail += f" ({request.detail[:200]})"
        elif request.reason in (fleet_pb2.DECLINE_REASON_CONDITIONS, fleet_pb2.DECLINE_REASON_ARTIFACT):
            detail = request.detail[:200]
        else:
            raise errors.InvalidArgument("DeclineTask needs a reason (DECLINE_REASON_MEMORY, _CONDITIONS or _ARTIFACT)")
        self.fed.decline(client_id, request.round, request.task_id, _DECLINE_KINDS[request.reason], detail)
        return fleet_pb2.DeclineTaskResponse()

    @unary_errors
    async def Leave(self, request: fleet_pb2.LeaveRequest, context: Context) -> fleet_pb2.LeaveResponse:
        client_id = self._client(context)
        await self.fed.leave(client_id)
        _LOGGER.info("[Fleet.Leave] %s left: %s", client_id, request.reason[:200])
        return fleet_pb2.LeaveResponse()


class ControlServicer(control_pb2_grpc.ControlServicer):
    def __init__(self, federation: Federation, operator_token_sha256: str | None = None) -> None:
        self.fed = federation
        self.operator_token_sha256 = operator_token_sha256

    def _authorize(self, context: Context) -> None:
        check_operator(self.operator_token_sha256, bearer_from_metadata(context.invocation_metadata()))

    @unary_errors
    async def GetStatus(self, request: control_pb2.GetStatusRequest, context: Context) -> control_pb2.Status:
        self._authorize(context)
        return wire.status_to_proto(self.fed.status())

    @unary_errors
    async def GetLedger(self, request: control_pb2.GetLedgerRequest, context: Context) -> control_pb2.Ledger:
        self._authorize(context)
        rows = await self.fed.ledger(request.from_round)
        return control_pb2.Ledger(rows=[wire.ledger_row_to_proto(r) for r in rows])

    @stream_errors
    async def StreamEvents(
        self, request: control_pb2.StreamEventsRequest, context: Context
    ) -> AsyncIterator[control_pb2.RoundEvent]:
        self._authorize(context)
        queue = self.fed.subscribe()
        try:
            if self.fed.finished:
                yield control_pb2.RoundEvent(
                    kind=control_pb2.RoundEvent.KIND_FEDERATION_FINISHED,
                    round=self.fed.current_round,
                    message="federation finished",
                )
                return
            while True:
                event = await queue.get()
                yield wire.event_to_proto(event)
                if event.kind == "finished":
                    return
        finally:
            self.fed.unsubscribe(queue)

    async def _control(self, action: Callable[[], None], context: Context) -> control_pb2.Status:
        self._authorize(context)
        action()
        return wire.status_to_proto(self.fed.status())

    @unary_errors
    async def Pause(self, request: control_pb2.PauseRequest, context: Context) -> control_pb2.Status:
        return await self._control(self.fed.pause, context)

    @unary_errors
    async def Resume(self, request: control_pb2.ResumeRequest, context: Context) -> control_pb2.Status:
        return await self._control(self.fed.resume, context)

    @unary_errors
    async def Stop(self, request: control_pb2.StopRequest, context: Context) -> control_pb2.Status:
        return await self._control(self.fed.stop, context)

    @stream_errors
    async def ExportModel(
        self, request: control_pb2.ExportModelRequest, context: Context
    ) -> AsyncIterator[control_pb2.ExportChunk]:
        self._authorize(context)
        choice, fmt = wire.export_request_from_proto(request)
        exported = await self.fed.export_model(choice, fmt)
        yield control_pb2.ExportChunk(model=wire.exported_model_to_proto(exported, self.fed.task))
        limit = self.fed.config.server.chunk_bytes
        chunk = max(MIN_CHUNK_BYTES, min(request.max_chunk_bytes or limit, limit))
        view = memoryview(exported.data)
        for start in range(0, len(view), chunk):
            yield control_pb2.ExportChunk(data=bytes(view[start : start + chunk]))
