"""The client's life: join, poll, fetch, train, upload; until the coordinator says DONE."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import numpy as np
import torch

from fedgen.core.data import Dataset
from fedgen.core.task import PreparedTask, prepare
from fedgen.core.transport import client_tls_credentials
from fedgen.edge.budget import (
    ACTIVATION_BYTES_PER_EXAMPLE,
    MemoryPlan,
    TaskNeeds,
    available_memory_mib,
    effective_budget_mib,
    freeze_start_up,
    peak_rss_mib,
    plan_task,
    release_free_memory,
    reset_peak_rss,
    rss_mib,
)
from fedgen.edge.conditions import Probe
from fedgen.edge.connection import FleetCallError, FleetConnection, RetryPolicy
from fedgen.edge.generator_runtime import OnnxGenerator
from fedgen.edge.trainer import (
    LocalTrainer,
    TrainPlan,
    activation_bytes_per_example,
    choose_onednn,
    latent_bytes_per_example,
    warm_up,
)
from fedgen.export.codec import (
    CodecError,
    Encoding,
    EncodingError,
    ErrorFeedback,
    apply_delta,
    bundle_from_bytes,
    bundle_to_bytes,
    decode_state,
    encode_state,
    sha256_hex,
    state_delta,
)
from fedgen.v1 import fleet_pb2, tensor_pb2

_LOGGER = logging.getLogger(__name__)

#: Cached artifacts kept per client (the current global model plus a few stragglers).
CACHE_KEEP = 4
#: Decoded global models kept (and reported in PollTask) as bases for deltas.
HELD_KEEP = 2
STATE_SUFFIX = ".state"
#: Where a device keeps its credential, in its cache folder (mode 0600).
CREDENTIAL_FILE = "credential"


class TaskRefused(FleetCallError):
    """The coordinator trains another task (or version) than this client: FAILED_PRECONDITION at Join."""


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
    # The task this device trains: a built-in's name or an import path package.module:Class.
    task: str = "mnist"
    # oneDNN kernels: "auto" times them for the task (small models never load them), or on/off.
    onednn: Literal["auto", "on", "off"] = "auto"
    seed: int = 0
    call_timeout_s: float = 30.0
    give_up_after_s: float = 600.0
    # TLS: the CA bundle that signed the coordinator (or a proxy in front of it); a client
    # certificate and key for mutual TLS; a name to check the server certificate against.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str = ""
    use_tls: bool = False
    # When the device is willing to train (None = always); see fedgen.edge.conditions.
    readiness: Probe | None = None
    # The link as the device's owner declared it, bits per second (0 = unknown).
    link_down_bps: int = 0
    link_up_bps: int = 0


@dataclass
class ClientSummary:
    client_id: str
    rounds_trained: int = 0
    updates_rejected: int = 0
    tasks_declined: int = 0
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
    if not cache_dir.is_dir():
        return
    files = sorted(
        (p for p in cache_dir.iterdir() if p.is_file() and len(p.name) == 64), key=lambda p: p.stat().st_mtime
    )
    for old in files[:-CACHE_KEEP]:
        old.unlink(missing_ok=True)
    for old in _held_states(cache_dir)[HELD_KEEP:]:
        old.unlink(missing_ok=True)


def _held_states(cache_dir: Path) -> list[Path]:
    """Decoded global models kept for deltas (`<artifact id>.state`, a fp32 bundle), newest first."""
    if not cache_dir.is_dir():
        return []
    return sorted(cache_dir.glob("*" + STATE_SUFFIX), key=lambda p: p.stat().st_mtime, reverse=True)


def held_models(cache_dir: Path) -> list[str]:
    """What PollTask tells the coordinator this client holds, so it may send a delta."""
    return [p.name[: -len(STATE_SUFFIX)] for p in _held_states(cache_dir)][:HELD_KEEP]


def load_global_model(model_path: Path, artifact_id: str, cache_dir: Path) -> dict[str, np.ndarray]:
    """The global model from its artifact: whole, or a difference against a model this client
    holds (``base_sha256``). The decoded state is kept for the next delta."""
    try:
        bundle = bundle_from_bytes(model_path.read_bytes())
        state = decode_state(bundle)
        if bundle.base_sha256:
            base = cache_dir / f"{bundle.base_sha256}{STATE_SUFFIX}"
            if not base.is_file():
                raise CodecError(
                    f"it is a difference against {bundle.base_sha256[:12]}, which this client no longer holds"
                )
            state = apply_delta(decode_state(bundle_from_bytes(base.read_bytes())), state)
    except CodecError as err:  # the task is declined with this reason (DECLINE_REASON_ARTIFACT)
        raise FleetCallError(grpc.StatusCode.DATA_LOSS, f"model {artifact_id[:12]}: {err}") from None
    tmp = cache_dir / f"{artifact_id}{STATE_SUFFIX}.tmp"
    tmp.write_bytes(bundle_to_bytes(encode_state(state, Encoding())))
    os.replace(tmp, cache_dir / f"{artifact_id}{STATE_SUFFIX}")
    return state


@dataclass(frozen=True)
class Device:
    """What this device can give a round: its memory budget (MiB, None = unknown) and threads."""

    budget_mib: float | None
    threads: int
    readiness: Probe | None = None
    # Measured for the task on this device at start-up (dry training steps), bytes.
    activation_bytes: int = 0
    latent_bytes: int = 0

    def state(self) -> fleet_pb2.DeviceState:
        reason = self.readiness() if self.readiness is not None else None
        return fleet_pb2.DeviceState(not_ready=reason is not None, reason=reason or "")


def read_local_data(task: PreparedTask, path: Path) -> tuple[Dataset, Dataset | None]:
    """The device's data as the task reads it, checked against the task's input spec and classes."""
    train, test = task.task.read_local(path)
    task.check(train, f"{path} (train)")
    if test is not None:
        task.check(test, f"{path} (test)")
    return train, test


def run_client(settings: ClientSettings) -> ClientSummary:
    torch.set_num_threads(max(1, settings.threads))
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)
    if not torch.backends.nnpack.is_available():  # e.g. arm64 without /sys: else a warning per convolution
        torch.backends.nnpack.set_flags(False)
    prepared = prepare(settings.task)
    if settings.onednn == "auto":
        _, why = choose_onednn(prepared)
    else:
        torch.backends.mkldnn.enabled = settings.onednn == "on"  # type: ignore[assignment]  # a descriptor in the stubs
        why = f"{settings.onednn} (--onednn)"
    _LOGGER.info("oneDNN %s", why)
    train, test = read_local_data(prepared, settings.data_path)
    # Examples stay as stored (uint8 pixels: 1 byte each) and are preprocessed a batch at a time.
    trainer = LocalTrainer(prepared, train.samples, train.labels, settings.seed)
    warm_up(prepared)  # torch's first-pass allocations happen now: what the process holds after is its baseline
    local_test = (test.samples, test.labels) if test is not None and len(test) else None
    available = available_memory_mib()
    device = Device(
        effective_budget_mib(settings.memory_budget_mb, available, rss_mib()),
        settings.threads,
        settings.readiness,
        activation_bytes_per_example(prepared),
        latent_bytes_per_example(prepared),
    )
    _LOGGER.info(
        "task %s (%d parameters); memory: budget %s MiB (declared %d, available %s), process %s MiB now, "
        "%.1f KiB per training example (measured)",
        prepared.identity.describe(),
        prepared.parameters,
        _fmt_mib(device.budget_mib),
        settings.memory_budget_mb,
        _fmt_mib(available),
        _fmt_mib(rss_mib()),
        device.activation_bytes / 1024,
    )
    freeze_start_up()  # every round's collection then walks only what the round allocated
    tls = settings.use_tls or settings.tls_ca is not None or settings.tls_cert is not None
    conn = FleetConnection(
        settings.coordinator,
        call_timeout_s=settings.call_timeout_s,
        retry=RetryPolicy(give_up_after_s=settings.give_up_after_s),
        seed=settings.seed,
        credentials=client_tls_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key) if tls else None,
        tls_server_name=settings.tls_server_name,
        device_state=device.state,
    )
    profile = fleet_pb2.DeviceProfile(
        memory_budget_mb=int(device.budget_mib or 0),
        available_memory_mb=int(available or 0),
        supported_encodings=[tensor_pb2.ENCODING_RAW, tensor_pb2.ENCODING_FP16, tensor_pb2.ENCODING_INT8],
        platform=f"{platform.system().lower()}-{platform.machine()} python{platform.python_version()} "
        f"torch{torch.__version__}",
        num_examples=len(train),
        link_down_bps=settings.link_down_bps,
        link_up_bps=settings.link_up_bps,
    )
    mine = prepared.identity
    identity = fleet_pb2.TaskIdentity(name=mine.name, version=mine.version, state_spec_sha256=mine.state_spec_sha256)
    kept = CredentialFile(_cache_dir(settings, settings.client_id)) if settings.client_id else None
    try:
        client_id = conn.join(
            settings.enrollment_token, profile, settings.client_id, identity, kept.read() if kept else ""
        )
    except FleetCallError as err:
        conn.close()
        if err.code == grpc.StatusCode.FAILED_PRECONDITION:
            raise TaskRefused(err.code, err.message) from None
        raise
    cache_dir = _cache_dir(settings, client_id)
    kept = CredentialFile(cache_dir)
    kept.write(conn.credential)
    summary = ClientSummary(client_id)
    feedback = ErrorFeedback()  # what lossy uploads left out, sent in later rounds
    refused_in_a_row = 0
    try:
        while True:
            try:
                task = conn.poll(settings.poll_wait_s, held_models(cache_dir))
                kind = task.WhichOneof("kind")
                if kind == "done":
                    _LOGGER.info("coordinator says done: %s", task.done.reason)
                    break
                if kind == "wait":
                    refused_in_a_row = 0
                    time.sleep(min(task.wait.retry_after_ms, 5_000) / 1000)
                    continue
                outcome = _train_and_upload(
                    conn, trainer, task.train, cache_dir, client_id, local_test, device, feedback
                )
                if outcome == "accepted":
                    summary.rounds_trained += 1
                elif outcome == "declined":
                    summary.tasks_declined += 1
                else:
                    summary.updates_rejected += 1
                refused_in_a_row = 0
                _prune_cache(cache_dir)
                release_free_memory()
            except FleetCallError as err:
                # The credential expired, or the coordinator's state was reset: the enrollment token
                # gets a fresh one. A credential refused again right after a fresh join is a real error.
                if err.code != grpc.StatusCode.UNAUTHENTICATED or refused_in_a_row >= 3:
                    raise
                refused_in_a_row += 1
                _LOGGER.warning("credential refused (%s); joining again", err.message)
                conn.join(settings.enrollment_token, profile, client_id, identity)
                kept.write(conn.credential)
    finally:
        summary.bytes_down, summary.bytes_up = conn.stats.bytes_down, conn.stats.bytes_up
        conn.close()
    return summary


def _cache_dir(settings: ClientSettings, client_id: str) -> Path:
    return settings.cache_dir or Path.home() / ".cache" / "fedgen" / client_id


class CredentialFile:
    """The credential this device was issued, kept (mode 0600) in its cache folder so a restarted
    client proves it is the same device when it rejoins its id."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / CREDENTIAL_FILE

    def read(self) -> str:
        try:
            return self.path.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return ""
        except (OSError, UnicodeDecodeError) as err:
            _LOGGER.warning("cannot read the kept credential %s (%s); joining without it", self.path, err)
            return ""

    def write(self, credential: str | None) -> None:
        if not credential:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(credential)
        os.replace(tmp, self.path)


def _generator_for(
    conn: FleetConnection, task: fleet_pb2.TrainTask, cache_dir: Path, threads: int
) -> OnnxGenerator | None:
    """The round's ONNX generator when the task asks for the regulariser, else None."""
    if task.config.params.get("regularize", 0.0) <= 0:
        return None
    refs = [a for a in task.extra_artifacts if a.kind == fleet_pb2.ARTIFACT_KIND_GENERATOR_ONNX]
    if not refs:
        raise FleetCallError(
            grpc.StatusCode.FAILED_PRECONDITION, "task asks for the regulariser but ships no generator"
        )
    return OnnxGenerator(_fetch_verified(conn, refs[0], cache_dir), threads=threads)


def _fetch_verified(conn: FleetConnection, ref: fleet_pb2.ArtifactRef, cache_dir: Path) -> Path:
    """The artifact, digest-checked; one fresh download more if the first failed its check."""
    try:
        return conn.fetch_artifact(ref, cache_dir)
    except FleetCallError as err:
        if err.code != grpc.StatusCode.DATA_LOSS:
            raise
        _LOGGER.warning("%s; downloading it again", err.message)
        return conn.fetch_artifact(ref, cache_dir)


def _fmt_mib(v: float | None) -> str:
    return "?" if v is None else f"{v:.0f}"


def _memory_plan(task: fleet_pb2.TrainTask, device: Device) -> MemoryPlan:
    cfg = task.config
    regularize = cfg.params.get("regularize", 0.0) > 0
    generator_bytes = sum(
        a.size_bytes for a in task.extra_artifacts if a.kind == fleet_pb2.ARTIFACT_KIND_GENERATOR_ONNX
    )
    needs = TaskNeeds(
        model_bytes=task.global_model.size_bytes,
        generator_bytes=generator_bytes if regularize else 0,
        batch_size=max(1, cfg.batch_size),
        gen_batch_size=int(cfg.params.get("gen_batch_size", 32)) if regularize else 0,
        activation_bytes=device.activation_bytes or ACTIVATION_BYTES_PER_EXAMPLE,
        latent_bytes=device.latent_bytes or ACTIVATION_BYTES_PER_EXAMPLE,
    )
    return plan_task(rss_mib() or 0.0, device.budget_mib, needs)


def _train_and_upload(
    conn: FleetConnection,
    trainer: LocalTrainer,
    task: fleet_pb2.TrainTask,
    cache_dir: Path,
    client_id: str,
    local_test: tuple[np.ndarray, np.ndarray] | None,
    device: Device,
    feedback: ErrorFeedback | None = None,
) -> str:
    """One task: 'accepted', 'rejected' (the coordinator refused the update) or 'declined'."""
    not_ready = device.readiness() if device.readiness is not None else None
    if not_ready is not None:  # conditions changed since the poll: say so rather than go quiet
        conn.decline(task, fleet_pb2.DECLINE_REASON_CONDITIONS, not_ready)
        _LOGGER.warning("round %d: declined (%s)", task.round, not_ready)
        return "declined"
    memory = _memory_plan(task, device)
    if not memory.fits:
        conn.decline(
            task,
            fleet_pb2.DECLINE_REASON_MEMORY,
            memory.reason,
            math.ceil(memory.needed_mib),
            int(memory.budget_mib or 0),
        )
        _LOGGER.warning("round %d: declined for memory: %s", task.round, memory.reason)
        return "declined"
    reset_peak_rss()
    rss_before, cpu_before = rss_mib(), time.process_time()
    conn.download_log.clear()
    try:
        model_path = _fetch_verified(conn, task.global_model, cache_dir)
        state = load_global_model(model_path, task.global_model.artifact_id, cache_dir)
        generator = _generator_for(conn, task, cache_dir, device.threads)
    except FleetCallError as err:
        if err.code != grpc.StatusCode.DATA_LOSS:
            raise
        conn.decline(task, fleet_pb2.DECLINE_REASON_ARTIFACT, err.message)
        _LOGGER.error("round %d: declined: %s", task.round, err.message)
        return "declined"
    cfg = task.config
    plan = TrainPlan(
        cfg.local_steps,
        cfg.batch_size,
        cfg.learning_rate,
        cfg.strategy,
        proximal_mu=cfg.params.get("proximal_mu", 0.0),
        generative_alpha=cfg.params.get("generative_alpha", 0.0),
        generative_beta=cfg.params.get("generative_beta", 0.0),
        gen_batch_size=int(cfg.params.get("gen_batch_size", 32)),
        label_space=tuple(task.label_space),
        micro_batch=memory.micro_batch if memory.micro_batch < cfg.batch_size else 0,
    )
    with _heartbeats(conn):
        evaluation = trainer.evaluate(state, *local_test) if local_test is not None else None
        result = trainer.train(state, plan, generator)
    if evaluation is not None:
        result.metrics["local_test_correct"], result.metrics["local_test_total"] = map(float, evaluation)
    payload = _encode_update(result.state, state, task, feedback or ErrorFeedback(), trainer.buffer_names)
    # What the round cost this device, measured: its own peak resident memory and CPU time.
    peak = peak_rss_mib()
    result.metrics["cpu_seconds"] = round(time.process_time() - cpu_before, 4)
    result.metrics["micro_batch"] = float(plan.micro_batch or plan.batch_size)
    result.metrics["estimated_peak_mb"] = round(memory.needed_mib, 1)
    if peak is not None:
        result.metrics["peak_rss_mb"] = round(peak, 1)
        result.metrics["rss_before_mb"] = round(rss_before or 0.0, 1)
    if device.budget_mib is not None:
        result.metrics["memory_budget_mb"] = round(device.budget_mib, 1)
        if peak is not None and peak > device.budget_mib:
            _LOGGER.error(
                "round %d: peak RSS %.0f MiB exceeded the %.0f MiB budget (estimated %.0f MiB)",
                task.round,
                peak,
                device.budget_mib,
                memory.needed_mib,
            )
    header = fleet_pb2.UpdateHeader(
        round=task.round,
        task_id=task.task_id,
        idempotency_key=f"{client_id}:{task.task_id}:{uuid.uuid5(uuid.NAMESPACE_OID, sha256_hex(payload)).hex[:8]}",
        num_examples=result.num_examples,
        label_counts=result.label_counts,
        payload_bytes=len(payload),
        payload_sha256=sha256_hex(payload),
        metrics=result.metrics,
        train_seconds=result.train_seconds,
        downloads=conn.download_log,
    )
    try:
        ack = conn.upload(header, payload)
    except FleetCallError as err:
        if err.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT):
            _LOGGER.warning("round %d: update not accepted: %s", task.round, err)
            return "rejected"
        raise
    _LOGGER.info(
        "round %d: update accepted%s (loss %.4f, %d steps, %.2fs)",
        ack.round,
        " (duplicate)" if ack.duplicate else "",
        result.metrics["loss"],
        plan.local_steps,
        result.train_seconds,
    )
    return "accepted"


def _encode_update(
    trained: dict[str, np.ndarray],
    received: dict[str, np.ndarray],
    task: fleet_pb2.TrainTask,
    feedback: ErrorFeedback,
    buffer_names: frozenset[str] = frozenset(),
) -> bytes:
    """The update in the encoding the coordinator asked for.

    ``fp32`` is the whole trained state, exact. Anything else is the difference against the
    model as this client decoded it, named by its artifact id, through error feedback: what a
    lossy encoding leaves out this round is added to the next one. BatchNorm statistics
    (``buffer_names``) travel exact and without that memory: they are states, not updates.
    """
    name = task.config.upload_encoding or "fp32"
    try:
        encoding = Encoding.parse(name)
    except EncodingError:
        _LOGGER.warning("round %d: unknown upload encoding %r; sending fp32", task.round, name)
        encoding = Encoding()
    if encoding == Encoding():
        return bundle_to_bytes(encode_state(trained, encoding))
    try:
        return bundle_to_bytes(
            feedback.encode(
                state_delta(trained, received), encoding.plain(), task.global_model.artifact_id, exact=buffer_names
            )
        )
    except (CodecError, EncodingError) as err:  # e.g. a diverged model with non-finite values, or int4
        _LOGGER.warning("round %d: cannot encode the update as %s (%s); sending fp32", task.round, encoding, err)
        return bundle_to_bytes(encode_state(trained, Encoding()))
