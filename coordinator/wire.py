"""Coordinator-side conversions between the round engine's domain objects and fedgen.v1 messages.

Only this module and the servicers import the generated `_pb2` modules on the server side.
"""
from __future__ import annotations

import math
from typing import Any

from google.protobuf import json_format

from coordinator.federation import (
    Assignment, DoneAssignment, Event, TrainAssignment, UploadHeader, UploadResult, WaitAssignment,
)
from coordinator.link_policy import DownloadTiming
from coordinator.strategy import GENERATOR_ONNX
from fedgen.v1 import control_pb2, fleet_pb2, tensor_pb2

_EVENT_KINDS = {
    "opened": control_pb2.RoundEvent.KIND_ROUND_OPENED,
    "accepted": control_pb2.RoundEvent.KIND_UPDATE_ACCEPTED,
    "rejected": control_pb2.RoundEvent.KIND_UPDATE_REJECTED,
    "committed": control_pb2.RoundEvent.KIND_ROUND_COMMITTED,
    "failed": control_pb2.RoundEvent.KIND_ROUND_FAILED,
    "finished": control_pb2.RoundEvent.KIND_FEDERATION_FINISHED,
    "joined": control_pb2.RoundEvent.KIND_CLIENT_JOINED,
}
_TENSOR_ENCODINGS = {"fp32": tensor_pb2.ENCODING_RAW, "fp16": tensor_pb2.ENCODING_FP16, "int8": tensor_pb2.ENCODING_INT8}
_ARTIFACT_KINDS = {GENERATOR_ONNX: fleet_pb2.ARTIFACT_KIND_GENERATOR_ONNX}
_STATES = {
    "waiting_for_clients": control_pb2.FEDERATION_STATE_WAITING_FOR_CLIENTS,
    "training": control_pb2.FEDERATION_STATE_TRAINING,
    "paused": control_pb2.FEDERATION_STATE_PAUSED,
    "finished": control_pb2.FEDERATION_STATE_FINISHED,
}


def profile_from_proto(p: fleet_pb2.DeviceProfile) -> dict[str, Any]:
    return {
        "memory_budget_mb": p.memory_budget_mb,
        "link_down_bps": p.link_down_bps,
        "link_up_bps": p.link_up_bps,
        "supported_encodings": [tensor_pb2.Encoding.Name(e) if e in tensor_pb2.Encoding.values() else int(e)
                                for e in p.supported_encodings],
        "platform": p.platform[:200],
        "num_examples": p.num_examples,
        "available_memory_mb": p.available_memory_mb,
    }


def assignment_to_proto(a: Assignment) -> fleet_pb2.Task:
    if isinstance(a, TrainAssignment):
        return fleet_pb2.Task(train=fleet_pb2.TrainTask(
            round=a.round,
            task_id=a.task_id,
            deadline_unix_ms=a.deadline_unix_ms,
            config=fleet_pb2.TrainConfig(
                local_steps=a.plan.local_steps, batch_size=a.plan.batch_size,
                learning_rate=a.plan.learning_rate, strategy=a.strategy, params=a.plan.params,
                upload_encoding=a.upload_encoding,
            ),
            global_model=fleet_pb2.ArtifactRef(
                artifact_id=a.model_sha256, size_bytes=a.model_size,
                kind=fleet_pb2.ARTIFACT_KIND_GLOBAL_MODEL, encoding=_TENSOR_ENCODINGS[a.model_encoding.removeprefix("delta-").split("+")[0]],
                encoding_name=a.model_encoding,
            ),
            label_space=list(a.label_space),
            extra_artifacts=[
                fleet_pb2.ArtifactRef(
                    artifact_id=x["sha256"], size_bytes=x["size"], kind=_ARTIFACT_KINDS[x["kind"]],
                    encoding_name=x.get("encoding_name", "fp32"),
                    compression=(tensor_pb2.COMPRESSION_ZSTD if x.get("encoding_name", "").endswith("+zstd")
                                 else tensor_pb2.COMPRESSION_NONE),
                )
                for x in a.extra_artifacts
            ],
        ))
    if isinstance(a, WaitAssignment):
        return fleet_pb2.Task(wait=fleet_pb2.WaitTask(retry_after_ms=a.retry_after_ms, reason=a.reason))
    assert isinstance(a, DoneAssignment)
    return fleet_pb2.Task(done=fleet_pb2.DoneTask(reason=a.reason))


def upload_header_from_proto(h: fleet_pb2.UpdateHeader) -> UploadHeader:
    return UploadHeader(
        round=h.round, task_id=h.task_id, idempotency_key=h.idempotency_key, num_examples=h.num_examples,
        label_counts=tuple(h.label_counts), payload_bytes=h.payload_bytes, payload_sha256=h.payload_sha256,
        metrics=dict(h.metrics), train_seconds=h.train_seconds,
        downloads=tuple(DownloadTiming(int(d.wire_bytes), float(d.seconds), float(d.first_chunk_seconds),
                                       int(d.first_chunk_bytes)) for d in h.downloads),
    )


def upload_result_to_proto(r: UploadResult) -> fleet_pb2.UploadAck:
    return fleet_pb2.UploadAck(accepted=True, duplicate=r.duplicate, round=r.round, received_bytes=r.received_bytes)


def ledger_row_to_proto(row: dict[str, Any]) -> control_pb2.LedgerRow:
    msg = control_pb2.LedgerRow()
    # NaN (not evaluated) is valid in proto doubles but not in JSON; set floats directly.
    plain = {k: v for k, v in row.items() if k not in ("test_accuracy", "test_loss", "attempt")}
    json_format.ParseDict(plain, msg, ignore_unknown_fields=True)
    msg.test_accuracy = float(row.get("test_accuracy", math.nan))
    msg.test_loss = float(row.get("test_loss", math.nan))
    return msg


def ledger_row_from_proto(msg: control_pb2.LedgerRow) -> dict[str, Any]:
    row = json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for key in ("round", "bytes_down", "bytes_up", "opened_unix_ms", "committed_unix_ms"):
        row[key] = int(row.get(key, 0))
    for client in row.get("clients", []):
        for key in ("bytes_down", "bytes_up", "num_examples"):
            client[key] = int(client.get(key, 0))
    row["test_accuracy"], row["test_loss"] = msg.test_accuracy, msg.test_loss
    return row


def event_to_proto(e: Event) -> control_pb2.RoundEvent:
    msg = control_pb2.RoundEvent(
        kind=_EVENT_KINDS[e.kind], round=e.round, unix_ms=e.unix_ms, client_id=e.client_id,
        message=e.message, cohort_size=e.cohort_size, updates_received=e.updates_received,
    )
    if e.ledger_row is not None:
        msg.ledger_row.CopyFrom(ledger_row_to_proto(e.ledger_row))
    return msg


def status_to_proto(s: dict[str, Any]) -> control_pb2.Status:
    return control_pb2.Status(**{**s, "state": _STATES[s["state"]]})
