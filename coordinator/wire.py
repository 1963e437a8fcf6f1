"""Coordinator-side conversions between the domain's records and ``fedgen.v1`` messages.

Only this module and the servicers import the generated ``_pb2`` modules on the server side.
Every field is mapped by name, both ways, so a field added on one side and not the other fails
the round-trip tests instead of vanishing.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import cast, get_args

from fedgen.coordinator import errors
from fedgen.coordinator.assignments import Assignment, DoneAssignment, TrainAssignment, WaitAssignment
from fedgen.coordinator.engine import FederationStatus
from fedgen.coordinator.events import Event, EventKind
from fedgen.coordinator.exports import ExportedModel, ModelChoice
from fedgen.coordinator.intake import MAX_DOWNLOAD_TIMINGS, UploadHeader, UploadResult
from fedgen.coordinator.ledger import ClientEntry, ClientTransfer, LedgerRow, Outcome, SkippedClient
from fedgen.coordinator.link_policy import DownloadTiming
from fedgen.coordinator.records import ClientProfile
from fedgen.coordinator.store import is_digest
from fedgen.coordinator.transfers import Variant
from fedgen.core.task import TaskIdentity
from fedgen.export.model_export import ExportFormat
from fedgen.export.tensor_codecs import codec_for
from fedgen.v1 import control_pb2, fleet_pb2, tensor_pb2

_EVENT_KINDS: dict[EventKind, control_pb2.RoundEvent.Kind.ValueType] = {
    "opened": control_pb2.RoundEvent.KIND_ROUND_OPENED,
    "accepted": control_pb2.RoundEvent.KIND_UPDATE_ACCEPTED,
    "rejected": control_pb2.RoundEvent.KIND_UPDATE_REJECTED,
    "committed": control_pb2.RoundEvent.KIND_ROUND_COMMITTED,
    "failed": control_pb2.RoundEvent.KIND_ROUND_FAILED,
    "finished": control_pb2.RoundEvent.KIND_FEDERATION_FINISHED,
    "joined": control_pb2.RoundEvent.KIND_CLIENT_JOINED,
}
_STATES = {
    "waiting_for_clients": control_pb2.FEDERATION_STATE_WAITING_FOR_CLIENTS,
    "training": control_pb2.FEDERATION_STATE_TRAINING,
    "paused": control_pb2.FEDERATION_STATE_PAUSED,
    "finished": control_pb2.FEDERATION_STATE_FINISHED,
}
#: The artifact kind the contract had before kinds became a map (ClientRoundEntry.generator_encoding).
_GENERATOR_KIND = "generator_onnx"
MAX_PLATFORM_CHARS = 200
MAX_TASK_FIELD_CHARS = 300
#: Bounds on what a client's messages may hold, checked before anything is kept or stored.
MAX_ENCODINGS = 16
MAX_LABELS = 10_000
MAX_METRICS = 32
MAX_METRIC_NAME_CHARS = 64
MAX_TASK_ID_CHARS = 128


def check_length(field: str, value: str | bytes, limit: int) -> None:
    """INVALID_ARGUMENT naming the field when a string or list is longer than the contract allows."""
    if len(value) > limit:
        raise errors.InvalidArgument(f"{field} has {len(value)} characters, at most {limit} are allowed")


def check_count(field: str, count: int, limit: int) -> None:
    if count > limit:
        raise errors.InvalidArgument(f"{field} has {count} entries, at most {limit} are allowed")


def artifact_kind(kind: str) -> fleet_pb2.ArtifactKind.ValueType:
    """A strategy's artifact kind as the contract's enum: ``generator_onnx`` -> ARTIFACT_KIND_GENERATOR_ONNX."""
    return fleet_pb2.ArtifactKind.Value(f"ARTIFACT_KIND_{kind.upper()}")


def profile_from_proto(p: fleet_pb2.DeviceProfile) -> ClientProfile:
    check_count("profile.supported_encodings", len(p.supported_encodings), MAX_ENCODINGS)
    check_length("profile.platform", p.platform, MAX_PLATFORM_CHARS)
    return ClientProfile(
        memory_budget_mb=p.memory_budget_mb,
        link_down_bps=p.link_down_bps,
        link_up_bps=p.link_up_bps,
        supported_encodings=tuple(
            tensor_pb2.Encoding.Name(e) if e in tensor_pb2.Encoding.values() else str(int(e))
            for e in p.supported_encodings
        ),
        platform=p.platform,
        num_examples=p.num_examples,
        available_memory_mb=p.available_memory_mb,
    )


def task_from_proto(t: fleet_pb2.TaskIdentity) -> TaskIdentity:
    """A client's declared task, checked for form (whether it is the right task is the registry's call)."""
    if not t.name or len(t.name) > MAX_TASK_FIELD_CHARS or len(t.version) > MAX_TASK_FIELD_CHARS:
        raise errors.InvalidArgument(
            f"task.name must be 1-{MAX_TASK_FIELD_CHARS} characters and task.version at most {MAX_TASK_FIELD_CHARS}"
        )
    if not is_digest(t.state_spec_sha256):
        raise errors.InvalidArgument("task.state_spec_sha256 must be 64 lower-case hex digits")
    return TaskIdentity(t.name, t.version, t.state_spec_sha256)


def task_to_proto(t: TaskIdentity) -> fleet_pb2.TaskIdentity:
    return fleet_pb2.TaskIdentity(name=t.name, version=t.version, state_spec_sha256=t.state_spec_sha256)


def _artifact_ref(variant: Variant, kind: fleet_pb2.ArtifactKind.ValueType) -> fleet_pb2.ArtifactRef:
    encoding = variant.encoding
    ref = fleet_pb2.ArtifactRef(
        artifact_id=variant.sha256,
        size_bytes=variant.size,
        kind=kind,
        encoding_name=encoding.name,
        compression=tensor_pb2.COMPRESSION_ZSTD if encoding.zstd else tensor_pb2.COMPRESSION_NONE,
    )
    if kind == fleet_pb2.ARTIFACT_KIND_GLOBAL_MODEL:  # the tensors' encoding (an ONNX artifact has none)
        ref.encoding = tensor_pb2.Encoding.ValueType(codec_for(encoding.plain()).wire)
        ref.compression = tensor_pb2.COMPRESSION_NONE  # a bundle's tensors say their own compression
    return ref


def assignment_to_proto(a: Assignment) -> fleet_pb2.Task:
    if isinstance(a, TrainAssignment):
        return fleet_pb2.Task(
            train=fleet_pb2.TrainTask(
                round=a.round,
                task_id=a.task_id,
                deadline_unix_ms=a.deadline_unix_ms,
                config=fleet_pb2.TrainConfig(
                    local_steps=a.plan.local_steps,
                    batch_size=a.plan.batch_size,
                    learning_rate=a.plan.learning_rate,
                    strategy=a.strategy,
                    params=a.plan.params,
                    upload_encoding=a.upload_encoding.name,
                ),
                global_model=_artifact_ref(a.model, fleet_pb2.ARTIFACT_KIND_GLOBAL_MODEL),
                label_space=list(a.label_space),
                extra_artifacts=[_artifact_ref(o.variant, artifact_kind(o.kind)) for o in a.artifacts],
            )
        )
    if isinstance(a, WaitAssignment):
        return fleet_pb2.Task(wait=fleet_pb2.WaitTask(retry_after_ms=a.retry_after_ms, reason=a.reason))
    assert isinstance(a, DoneAssignment)
    return fleet_pb2.Task(done=fleet_pb2.DoneTask(reason=a.reason))


def upload_header_from_proto(h: fleet_pb2.UpdateHeader) -> UploadHeader:
    check_length("header.task_id", h.task_id, MAX_TASK_ID_CHARS)
    check_count("header.label_counts", len(h.label_counts), MAX_LABELS)
    check_count("header.metrics", len(h.metrics), MAX_METRICS)
    check_count("header.downloads", len(h.downloads), MAX_DOWNLOAD_TIMINGS)
    long_name = next((k for k in h.metrics if len(k) > MAX_METRIC_NAME_CHARS), None)
    if long_name is not None:
        check_length(f"header.metrics key {long_name[:20]!r}...", long_name, MAX_METRIC_NAME_CHARS)
    return UploadHeader(
        round=h.round,
        task_id=h.task_id,
        idempotency_key=h.idempotency_key,
        num_examples=h.num_examples,
        label_counts=tuple(h.label_counts),
        payload_bytes=h.payload_bytes,
        payload_sha256=h.payload_sha256,
        metrics=dict(h.metrics),
        train_seconds=h.train_seconds,
        downloads=tuple(
            DownloadTiming(int(d.wire_bytes), float(d.seconds), float(d.first_chunk_seconds), int(d.first_chunk_bytes))
            for d in h.downloads
        ),
    )


def upload_result_to_proto(r: UploadResult) -> fleet_pb2.UploadAck:
    return fleet_pb2.UploadAck(accepted=True, duplicate=r.duplicate, round=r.round, received_bytes=r.received_bytes)


# --------------------------------------------------------------------------- ledger


def _client_to_proto(c: ClientEntry) -> control_pb2.ClientRoundEntry:
    t = c.transfer
    return control_pb2.ClientRoundEntry(
        client_id=c.client_id,
        outcome=c.outcome,
        reason=c.reason,
        bytes_down=c.bytes_down,
        bytes_up=c.bytes_up,
        num_examples=c.num_examples,
        train_seconds=c.train_seconds,
        metrics=c.metrics,
        model_encoding=t.model_encoding,
        generator_encoding=t.artifact_encodings.get(_GENERATOR_KIND, ""),
        upload_encoding=t.upload_encoding,
        artifact_encodings=t.artifact_encodings,
        down_seconds=c.down_seconds,
        up_seconds=c.up_seconds,
        estimated_down_bps=t.estimated_down_bps,
        estimated_up_bps=t.estimated_up_bps,
        expected_transfer_seconds=t.expected_transfer_seconds,
    )


def _client_from_proto(m: control_pb2.ClientRoundEntry) -> ClientEntry:
    artifacts = dict(m.artifact_encodings)
    if m.generator_encoding and _GENERATOR_KIND not in artifacts:
        artifacts[_GENERATOR_KIND] = m.generator_encoding
    transfer = ClientTransfer(
        m.model_encoding,
        m.upload_encoding,
        artifacts,
        m.estimated_down_bps,
        m.estimated_up_bps,
        m.expected_transfer_seconds,
    )
    if m.outcome not in get_args(Outcome):
        raise ValueError(f"ledger entry of {m.client_id!r} has an unknown outcome {m.outcome!r}")
    return ClientEntry(
        m.client_id,
        cast(Outcome, m.outcome),
        m.reason,
        m.bytes_down,
        m.bytes_up,
        m.num_examples,
        m.train_seconds,
        dict(m.metrics),
        transfer,
        m.down_seconds,
        m.up_seconds,
    )


def ledger_row_to_proto(row: LedgerRow) -> control_pb2.LedgerRow:
    return control_pb2.LedgerRow(
        round=row.round,
        attempt=row.attempt,
        strategy=row.strategy,
        cohort_size=row.cohort_size,
        completed=row.completed,
        dropped=row.dropped,
        rejected=row.rejected,
        declined=row.declined,
        bytes_down=row.bytes_down,
        bytes_up=row.bytes_up,
        wait_seconds=row.wait_seconds,
        aggregate_seconds=row.aggregate_seconds,
        evaluate_seconds=row.evaluate_seconds,
        round_seconds=row.round_seconds,
        test_accuracy=row.test_accuracy,
        test_loss=row.test_loss,
        opened_unix_ms=row.opened_unix_ms,
        committed_unix_ms=row.committed_unix_ms,
        clients=[_client_to_proto(c) for c in row.clients],
        extras=row.extras,
        model_sha256=row.model_sha256,
        skipped=[control_pb2.SkippedClient(**asdict(s)) for s in row.skipped],
        encoding_policy=row.encoding_policy,
        transfer_budget_seconds=row.transfer_budget_seconds,
    )


def ledger_row_from_proto(m: control_pb2.LedgerRow) -> LedgerRow:
    return LedgerRow(
        round=m.round,
        attempt=m.attempt,
        strategy=m.strategy,
        cohort_size=m.cohort_size,
        completed=m.completed,
        dropped=m.dropped,
        rejected=m.rejected,
        declined=m.declined,
        bytes_down=m.bytes_down,
        bytes_up=m.bytes_up,
        wait_seconds=m.wait_seconds,
        aggregate_seconds=m.aggregate_seconds,
        evaluate_seconds=m.evaluate_seconds,
        round_seconds=m.round_seconds,
        test_accuracy=m.test_accuracy,
        test_loss=m.test_loss,
        opened_unix_ms=m.opened_unix_ms,
        committed_unix_ms=m.committed_unix_ms,
        encoding_policy=m.encoding_policy,
        transfer_budget_seconds=m.transfer_budget_seconds,
        model_sha256=m.model_sha256,
        clients=tuple(_client_from_proto(c) for c in m.clients),
        skipped=tuple(SkippedClient(s.client_id, s.reason) for s in m.skipped),
        extras=dict(m.extras),
    )


def event_to_proto(e: Event) -> control_pb2.RoundEvent:
    msg = control_pb2.RoundEvent(
        kind=_EVENT_KINDS[e.kind],
        round=e.round,
        unix_ms=e.unix_ms,
        client_id=e.client_id,
        message=e.message,
        cohort_size=e.cohort_size,
        updates_received=e.updates_received,
    )
    if e.ledger_row is not None:
        msg.ledger_row.CopyFrom(ledger_row_to_proto(e.ledger_row))
    return msg


def status_to_proto(s: FederationStatus) -> control_pb2.Status:
    return control_pb2.Status(
        federation_id=s.federation_id,
        state=_STATES[s.state],
        current_round=s.current_round,
        total_rounds=s.total_rounds,
        connected_clients=s.connected_clients,
        eligible_clients=s.eligible_clients,
        cohort_size=s.cohort_size,
        updates_received=s.updates_received,
        strategy=s.strategy,
        last_accuracy=s.last_accuracy,
        task=task_to_proto(s.task),
    )


_EXPORT_FORMATS: dict[ExportFormat, control_pb2.ExportFormat.ValueType] = {
    "onnx": control_pb2.EXPORT_FORMAT_ONNX,
    "bundle": control_pb2.EXPORT_FORMAT_BUNDLE,
    "torch": control_pb2.EXPORT_FORMAT_TORCH,
}


def export_request_from_proto(m: control_pb2.ExportModelRequest) -> tuple[ModelChoice, ExportFormat]:
    formats = {v: k for k, v in _EXPORT_FORMATS.items()}
    if m.format not in formats:
        raise errors.InvalidArgument("format must be EXPORT_FORMAT_ONNX, EXPORT_FORMAT_BUNDLE or EXPORT_FORMAT_TORCH")
    which = m.WhichOneof("which")
    if which == "round":
        return ModelChoice("round", m.round), formats[m.format]
    return ModelChoice("best" if which == "best" and m.best else "latest"), formats[m.format]


def exported_model_to_proto(e: ExportedModel, task: TaskIdentity) -> control_pb2.ExportedModel:
    return control_pb2.ExportedModel(
        task=task_to_proto(task),
        format=_EXPORT_FORMATS[e.format],
        round=e.model.round,
        committed=e.model.committed,
        test_accuracy=e.model.test_accuracy,
        model_sha256=e.model.model_sha256,
        total_size=len(e.data),
        sha256=e.sha256,
    )
