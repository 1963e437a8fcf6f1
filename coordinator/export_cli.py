"""``fedgen export``: a trained global model as a file to deploy, from a state folder or from a
running coordinator (Control.ExportModel), for the latest round, a given round or the best one."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from pathlib import Path

import grpc

from fedgen.coordinator import errors
from fedgen.coordinator.exports import ChosenModel, ExportedModel, ModelChoice, export_chosen
from fedgen.coordinator.file_blobs import FileBlobStore
from fedgen.coordinator.sqlite_store import SqliteStateStore, StoreError
from fedgen.core.data import DataError
from fedgen.core.files import atomic_write
from fedgen.core.task import PreparedTask, TaskError, TaskIdentity, prepare
from fedgen.core.transport import bearer_metadata, channel_options, client_tls_credentials
from fedgen.export.model_export import EXPORT_FORMATS, ExportFormat
from fedgen.v1 import control_pb2, control_pb2_grpc

STATE_FILE = "state.sqlite3"
_FORMAT_ENUMS = {
    "onnx": control_pb2.EXPORT_FORMAT_ONNX,
    "bundle": control_pb2.EXPORT_FORMAT_BUNDLE,
    "torch": control_pb2.EXPORT_FORMAT_TORCH,
}


class ExportError(Exception):
    """What the user asked for cannot be exported; the message says why."""


def add_export_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="write a trained global model as ONNX, a TensorBundle or a torch state dict")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--state-dir", type=Path, help="a coordinator's state folder (it may be running)")
    source.add_argument("--coordinator", help="a running coordinator's address, e.g. 10.0.0.5:50051")
    p.add_argument("--task", help="with --state-dir: the task (default: the one the federation records)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--round", type=int, help="the global model this round committed")
    which.add_argument("--best", action="store_true", help="the round with the highest test accuracy")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", type=Path, required=True, help="the file to write")
    p.add_argument("--operator-token", default="", help="with --coordinator: the operator token, if it has one")
    p.add_argument("--tls-ca", type=Path, help="with --coordinator: PEM CA bundle to verify it with (TLS)")
    p.add_argument("--log-level", default="WARNING")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if args.round is not None and args.round < 0:
        print("fedgen export: --round must be 0 or more", file=sys.stderr)
        return 2
    choice = (
        ModelChoice("round", args.round) if args.round is not None else ModelChoice("best" if args.best else "latest")
    )
    try:
        if args.state_dir is not None:
            exported, task = asyncio.run(_from_state(args.state_dir, args.task, choice, args.format))
        else:
            exported, task = _from_coordinator(args, choice)
    except (ExportError, TaskError, DataError, StoreError, errors.FederationError) as err:
        print(f"fedgen export: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"fedgen export: {err.code().name}: {err.details()}", file=sys.stderr)
        return 2 if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION) else 1
    atomic_write(args.out, exported.data)
    m = exported.model
    print(
        json.dumps(
            {
                "out": str(args.out),
                "format": exported.format,
                "bytes": len(exported.data),
                "sha256": exported.sha256,
                "task": task.describe(),
                "round": m.round if m.committed else None,
                "test_accuracy": m.test_accuracy,
                "model_sha256": m.model_sha256,
            }
        )
    )
    return 0


async def _from_state(
    state_dir: Path, task_name: str | None, choice: ModelChoice, fmt: ExportFormat
) -> tuple[ExportedModel, TaskIdentity]:
    db = state_dir.expanduser() / STATE_FILE
    if not db.is_file():
        raise ExportError(f"{state_dir} holds no federation (no {STATE_FILE})")
    store = await SqliteStateStore.open(db)
    try:
        recorded = await store.get_meta("task")
        source = task_name or await store.get_meta("task_source")
        if source is None:
            raise ExportError(f"{state_dir} does not record its task: name it with --task")
        task = await asyncio.to_thread(prepare, source)
        _check_recorded(task, recorded, state_dir)
        exported = await export_chosen(store, FileBlobStore(db.parent / "blobs"), task, choice, fmt)
        return exported, task.identity
    finally:
        await store.close()


def _check_recorded(task: PreparedTask, recorded: str | None, state_dir: Path) -> None:
    if recorded is None:
        return
    theirs = TaskIdentity(**json.loads(recorded))
    if theirs != task.identity:
        raise ExportError(f"{state_dir} holds a federation of task {theirs.describe()}, not {task.identity.describe()}")


def _from_coordinator(args: argparse.Namespace, choice: ModelChoice) -> tuple[ExportedModel, TaskIdentity]:
    request = control_pb2.ExportModelRequest(format=_FORMAT_ENUMS[args.format])
    if choice.which == "round":
        request.round = choice.round or 0
    elif choice.which == "best":
        request.best = True
    else:
        request.latest = True
    credentials = client_tls_credentials(args.tls_ca, None, None) if args.tls_ca else None
    options = channel_options()
    channel = (
        grpc.secure_channel(args.coordinator, credentials, options)
        if credentials
        else grpc.insecure_channel(args.coordinator, options)
    )
    with channel:
        stream = control_pb2_grpc.ControlStub(channel).ExportModel(
            request, timeout=300, metadata=bearer_metadata(args.operator_token) if args.operator_token else ()
        )
        first = next(stream)
        if first.WhichOneof("part") != "model":
            raise ExportError("the coordinator's stream did not start with the model's description")
        info = first.model
        data = b"".join(chunk.data for chunk in stream)
    if len(data) != info.total_size or hashlib.sha256(data).hexdigest() != info.sha256:
        raise ExportError(
            f"received {len(data)} bytes that do not match the described {info.total_size} bytes "
            f"and sha256 {info.sha256[:12]}"
        )
    chosen = ChosenModel(info.model_sha256, info.round, info.committed, info.test_accuracy)
    task = TaskIdentity(info.task.name, info.task.version, info.task.state_spec_sha256)
    return ExportedModel(chosen, args.format, data), task
