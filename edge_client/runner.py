"""The client's life: join, poll, fetch, train, upload; until the coordinator says DONE."""
from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import torch

from edge_client.connection import FleetCallError, FleetConnection
from edge_client.generator_runtime import OnnxGenerator
from edge_client.trainer import LocalTrainer, TrainPlan
from export.codec import EncodingSpec, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state, sha256_hex
from fedcore.data import load_shard, normalize_images
from fedcore.transport import client_tls_credentials
from fedgen.v1 import fleet_pb2, tensor_pb2

_LOGGER = logging.getLogger(__name__)

#: Cached artifacts kept per client (the current global model plus a few stragglers).
CACHE_KEEP = 4


@dataclass(frozen=True)
class ClientSettings:
    coordinator: str
    enrollment_token: str
    data_path: Path
    client_id: str = ""
    cache_dir: Path | None = None
    threads: int = 1
    poll_wait_s: float = 15.0
    memory_budget_mb: int = 0
    n_classes: int = 10
    seed: int = 0
    call_timeout_s: float = 30.0
    # TLS: the CA bundle that signed the coordinator (or a proxy in front of it); a client
    # certificate and key for mutual TLS; a name to check the server certificate against.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str = ""
    use_tls: bool = False


@dataclass
class ClientSummary:
    client_id: str
    rounds_trained: int = 0
    updates_rejected: int = 0
    bytes_down: int = 0
    bytes_up: int = 0


@contextlib.contextmanager
def _heartbeats(conn: FleetConnection) -> Iterator[None]:
    """Heartbeats while training so a long local round never looks like a dead client."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(conn.heartbeat_interval_s):
            with contextlib.suppress(FleetCallError):
                conn.heartbeat(busy=True)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1.0)


def _prune_cache(cache_dir: Path) -> None:
    files = sorted((p for p in cache_dir.iterdir() if p.is_file() and len(p.name) == 64), key=lambda p: p.stat().st_mtime)
    for old in files[:-CACHE_KEEP]:
        old.unlink(missing_ok=True)


def run_client(settings: ClientSettings) -> ClientSummary:
    torch.set_num_threads(max(1, settings.threads))
    train, test = load_shard(settings.data_path)
    trainer = LocalTrainer(normalize_images(train.images), train.labels, settings.n_classes, settings.seed)
    local_test = (normalize_images(test.images), test.labels) if test is not None and len(test) else None
    tls = settings.use_tls or settings.tls_ca is not None or settings.tls_cert is not None
    conn = FleetConnection(
        settings.coordinator, call_timeout_s=settings.call_timeout_s, seed=settings.seed,
        credentials=client_tls_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key) if tls else None,
        tls_server_name=settings.tls_server_name,
    )
    profile = fleet_pb2.DeviceProfile(
        memory_budget_mb=settings.memory_budget_mb,
        supported_encodings=[tensor_pb2.ENCODING_RAW, tensor_pb2.ENCODING_FP16, tensor_pb2.ENCODING_INT8],
        platform=f"{platform.system().lower()}-{platform.machine()} python{platform.python_version()} torch{torch.__version__}",
        num_examples=len(train),
    )
    client_id = conn.join(settings.enrollment_token, profile, settings.client_id)
    cache_dir = settings.cache_dir or Path.home() / ".cache" / "fedgen" / client_id
    summary = ClientSummary(client_id)
    refused_in_a_row = 0
    try:
        while True:
            try:
                task = conn.poll(settings.poll_wait_s)
                kind = task.WhichOneof("kind")
                if kind == "done":
                    _LOGGER.info("coordinator says done: %s", task.done.reason)
                    break
                if kind == "wait":
                    refused_in_a_row = 0
                    time.sleep(min(task.wait.retry_after_ms, 5_000) / 1000)
                    continue
                if _train_and_upload(conn, trainer, task.train, cache_dir, client_id, local_test, settings.threads):
                    summary.rounds_trained += 1
                else:
                    summary.updates_rejected += 1
                refused_in_a_row = 0
                _prune_cache(cache_dir)
            except FleetCallError as err:
                # The credential expired, or the coordinator's state was reset: the enrollment token
                # gets a fresh one. A credential refused again right after a fresh join is a real error.
                if err.code != grpc.StatusCode.UNAUTHENTICATED or refused_in_a_row >= 3:
                    raise
                refused_in_a_row += 1
                _LOGGER.warning("credential refused (%s); joining again", err.message)
                conn.join(settings.enrollment_token, profile, client_id)
    finally:
        summary.bytes_down, summary.bytes_up = conn.stats.bytes_down, conn.stats.bytes_up
        conn.close()
    return summary


def _generator_for(conn: FleetConnection, task: fleet_pb2.TrainTask, cache_dir: Path,
                   threads: int) -> OnnxGenerator | None:
    """The round's ONNX generator when the task asks for the regulariser, else None."""
    if task.config.params.get("regularize", 0.0) <= 0:
        return None
    refs = [a for a in task.extra_artifacts if a.kind == fleet_pb2.ARTIFACT_KIND_GENERATOR_ONNX]
    if not refs:
        raise FleetCallError(grpc.StatusCode.FAILED_PRECONDITION, "task asks for the regulariser but ships no generator")
    return OnnxGenerator(conn.fetch_artifact(refs[0], cache_dir), threads=threads)


def _train_and_upload(conn: FleetConnection, trainer: LocalTrainer, task: fleet_pb2.TrainTask,
                      cache_dir: Path, client_id: str, local_test: tuple[np.ndarray, np.ndarray] | None,
                      threads: int) -> bool:
    model_path = conn.fetch_artifact(task.global_model, cache_dir)
    state = decode_state(bundle_from_bytes(model_path.read_bytes()))
    generator = _generator_for(conn, task, cache_dir, threads)
    cfg = task.config
    plan = TrainPlan(
        cfg.local_steps, cfg.batch_size, cfg.learning_rate, cfg.strategy,
        proximal_mu=cfg.params.get("proximal_mu", 0.0),
        generative_alpha=cfg.params.get("generative_alpha", 0.0),
        generative_beta=cfg.params.get("generative_beta", 0.0),
        gen_batch_size=int(cfg.params.get("gen_batch_size", 32)),
        label_space=tuple(task.label_space),
    )
    with _heartbeats(conn):
        evaluation = trainer.evaluate(state, *local_test) if local_test is not None else None
        result = trainer.train(state, plan, generator)
    if evaluation is not None:
        result.metrics["local_test_correct"], result.metrics["local_test_total"] = map(float, evaluation)
    payload = bundle_to_bytes(encode_state(result.state, EncodingSpec()))
    header = fleet_pb2.UpdateHeader(
        round=task.round, task_id=task.task_id,
        idempotency_key=f"{client_id}:{task.task_id}:{uuid.uuid5(uuid.NAMESPACE_OID, sha256_hex(payload)).hex[:8]}",
        num_examples=result.num_examples, label_counts=result.label_counts,
        payload_bytes=len(payload), payload_sha256=sha256_hex(payload),
        metrics=result.metrics, train_seconds=result.train_seconds,
    )
    try:
        ack = conn.upload(header, payload)
    except FleetCallError as err:
        if err.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
            _LOGGER.warning("round %d: update not accepted: %s", task.round, err)
            return False
        raise
    _LOGGER.info("round %d: update accepted%s (loss %.4f, %d steps, %.2fs)", ack.round,
                 " (duplicate)" if ack.duplicate else "", result.metrics["loss"], plan.local_steps,
                 result.train_seconds)
    return True
