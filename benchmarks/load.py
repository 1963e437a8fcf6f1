"""Load: one real coordinator, N protocol-level clients over loopback gRPC, no torch on the client side.

The coordinator is the real one: LocalFederation starts `coordinator serve` as its own process
(FedAvg, the builtin MNIST test subset). The clients are simulated: `--workers` processes, each
running about N/workers clients on one grpc.aio event loop, each client on its own channel (its
own TCP connection) unless `--channels` says otherwise. Every client speaks the Fleet protocol as
a device does:

  Join (enrollment token) -> loop: PollTask (a long poll) ->
    TRAIN: DownloadArtifact the global model (sha256 verified), decode it with fedgen.export.codec,
           Heartbeat(busy), sleep `--train-seconds` (training stands in), UploadUpdate the global
           state plus small noise (header, then 64 KiB chunks; idempotency key, num_examples,
           label counts summing to it; retried with the same key on a transient status);
    WAIT:  sleep retry_after_ms;  DONE: Leave and stop.
  A Heartbeat when heartbeat_interval_ms (from Join) has passed since the client's last call: a
  long poll is itself the proof of life (fleet.proto), so as with the edge client, idle clients
  that keep polling send none. A Heartbeat is not retried: the next one says the same.

A client's first poll after Join and after each upload asks max_wait_ms=0 (a short poll the
server answers at once); the others are long polls of `--poll-wait-ms`, which the server holds
until there is a task for that client. Long polls are reported by outcome as they are (their time
is mostly waiting by design), plus two derived figures that do measure the server: task dispatch
(round opened -> TRAIN in the client's hands) and long-poll overshoot (time held - max_wait).

Measured: per-RPC latency (count, errors by status code, p50/p90/p99/max), throughput (RPCs/s,
updates/s), the coordinator's RSS (VmRSS) and CPU every 0.5 s, rounds committed and seconds per
round, accepted / rejected / lost updates. Lost = acknowledged as accepted by the server but not
"completed" in the ledger that Control GetLedger returns; it must be 0. Writes
benchmarks/results/load.{json,csv,png} and prints a table.

    python benchmarks/load.py                                        # 1000 clients, cohort 100, 5 rounds
    python benchmarks/load.py --clients 100 --cohort 20 --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import numpy as np
from common import REPO_ROOT, RESULTS_DIR, command_line, write_results

from fedgen.coordinator.config import ConfigError, CoordinatorConfig, parse_config
from fedgen.coordinator.plots import save_figure
from fedgen.core.retry import RetryPolicy
from fedgen.core.transport import DEFAULT_CHUNK_BYTES, bearer_metadata, channel_options
from fedgen.export.codec import Encoding, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from fedgen.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc

NAME = "load"
SCRIPT = "benchmarks/load.py"
TOKEN = "load-benchmark-enrollment-token"
N_CLASSES = 10
#: What a simulated client retries, and how long it waits: the edge client's policy
#: (`fedgen.core.retry`: "try later" codes, backoff with full jitter, the server's pushback as a
#: floor), with shorter waits since a simulated round is short.
RETRY = RetryPolicy(initial_backoff_s=0.2, max_backoff_s=5.0)
RSS_INTERVAL_S = 0.5

# Measures, in table order: (key, rpc, what it is).
MEASURES: tuple[tuple[str, str, str], ...] = (
    ("Join", "Join", "Join"),
    ("Join.total", "Join", "  Join including its retries"),
    ("PollTask", "PollTask", "PollTask, non-waiting (max_wait_ms=0)"),
    ("PollTask.dispatch", "PollTask", "  task dispatch: round opened -> TRAIN received"),
    ("PollTask.overshoot", "PollTask", "  long poll held past max_wait (WAIT)"),
    ("PollTask.long.TRAIN", "PollTask", "  long poll -> TRAIN, as is (waits for a round)"),
    ("PollTask.long.WAIT", "PollTask", "  long poll -> WAIT, as is (~max_wait)"),
    ("PollTask.long.DONE", "PollTask", "  long poll -> DONE, as is"),
    ("DownloadArtifact", "DownloadArtifact", "DownloadArtifact (global model, whole stream)"),
    ("UploadUpdate", "UploadUpdate", "UploadUpdate (header + chunks -> ack)"),
    ("Heartbeat", "Heartbeat", "Heartbeat"),
    ("Leave", "Leave", "Leave"),
)
DERIVED = {"Join.total", "PollTask.dispatch", "PollTask.overshoot"}
RPC_NAMES = ("Join", "PollTask", "DownloadArtifact", "UploadUpdate", "Heartbeat", "Leave")

T = TypeVar("T")


# ============================================================================ the simulated clients
@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs; picklable (it crosses a spawn)."""

    worker: int
    address: str
    first: int  # global index of this worker's first client
    count: int
    channels: int  # 0 = one channel (TCP connection) per client
    start_unix: float  # the benchmark's time origin
    deadline_unix: float  # every client stops by then, whatever happened
    ramp_s: float
    poll_wait_ms: int
    train_s: float
    round_timeout_ms: int
    seed: int
    result_path: str


@dataclass
class Recorder:
    """One worker's measurements (plain lists and dicts, written as JSON at the end)."""

    start_unix: float
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    retries: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))  # rpc -> code
    per_second: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    dispatch: list[tuple[int, float]] = field(default_factory=list)  # (round, ms)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    loop_lag_ms: list[float] = field(default_factory=list)

    def ok(self, key: str, rpc: str, ms: float) -> None:
        self.latency_ms[key].append(ms)
        self.per_second[rpc][int(time.time() - self.start_unix)] += 1

    def error(self, rpc: str, code: str) -> None:
        self.errors[rpc][code] += 1
        self.per_second[rpc][int(time.time() - self.start_unix)] += 1

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)


class SimClient:
    """One device: the Fleet protocol on the generated grpc.aio stubs, nothing else."""

    def __init__(self, index: int, spec: WorkerSpec, channel: grpc.aio.Channel, rec: Recorder) -> None:
        self.index = index
        self.spec = spec
        self.stub = fleet_pb2_grpc.FleetStub(channel)
        self.rec = rec
        self.rng = np.random.default_rng([spec.seed, index])
        self.jitter = random.Random(spec.seed * 1_000_003 + index)
        self.requested_id = f"load-{index:05d}"
        self.client_id = ""
        self.md: tuple[tuple[str, str], ...] = ()
        self.heartbeat_s = 20.0
        self.last_heartbeat = 0.0
        self.model_sha = ""  # the content-addressed cache: one model, the latest
        self.model: dict[str, np.ndarray] = {}

    def remaining_s(self) -> float:
        return self.spec.deadline_unix - time.time()

    def timeout(self, want_s: float) -> float:
        return max(0.5, min(want_s, self.remaining_s()))

    async def _backoff(self, attempt: int) -> None:
        await asyncio.sleep(RETRY.backoff(attempt, self.jitter))

    async def retried(self, rpc: str, err: grpc.aio.AioRpcError, attempt: int) -> bool:
        """Waits before retrying `err`'s call; False when it is not worth retrying (or no time is left)."""
        self.rec.error(rpc, err.code().name)
        delay = RETRY.delay(err, attempt, self.jitter)
        if delay is None or self.remaining_s() < delay + 2:
            return False
        self.rec.retries[rpc][err.code().name] += 1
        await asyncio.sleep(delay)
        return True

    async def unary(self, key: str, rpc: str, call: Callable[[], Awaitable[T]], retry: bool = True) -> T | None:
        """Times one unary call, retrying "try later" refusals; None when it failed for good.

        `key`'s latency is the call that succeeded; for Join, ``Join.total`` includes the retries."""
        first = time.perf_counter()
        for attempt in itertools.count():
            t0 = time.perf_counter()
            try:
                reply = await call()
            except grpc.aio.AioRpcError as err:
                if retry and await self.retried(rpc, err, attempt):
                    continue
                if not retry:
                    self.rec.error(rpc, err.code().name)
                self.rec.problem(f"{self.requested_id} {rpc}: {err.code().name} {err.details()}")
                return None
            done = time.perf_counter()
            self.rec.ok(key, rpc, (done - t0) * 1000)
            if key == "Join":
                self.rec.latency_ms["Join.total"].append((done - first) * 1000)
            return reply
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ the protocol
    async def run(self) -> None:
        await asyncio.sleep(random.uniform(0, self.spec.ramp_s))
        reply = await self.unary(
            "Join",
            "Join",
            lambda: self.stub.Join(
                fleet_pb2.JoinRequest(
                    enrollment_token=TOKEN,
                    requested_client_id=self.requested_id,
                    profile=fleet_pb2.DeviceProfile(
                        platform="load-benchmark simulated client (no torch)", memory_budget_mb=256
                    ),
                ),
                timeout=self.timeout(30),
            ),
        )
        if reply is None:
            self.rec.outcomes["join failed"] += 1
            return
        self.client_id, self.md = reply.client_id, bearer_metadata(reply.credential)
        self.heartbeat_s = max(1.0, reply.heartbeat_interval_ms / 1000)
        self.last_heartbeat = time.monotonic()
        short, failures = True, 0
        while True:
            if self.remaining_s() < 1:
                self.rec.outcomes["global timeout"] += 1
                await self.leave("benchmark timeout")
                return
            if time.monotonic() - self.last_heartbeat >= self.heartbeat_s:
                await self.heartbeat(busy=False)
            task = await self.poll(short)
            short = False
            if task is None:
                failures += 1
                if failures > 10:
                    self.rec.outcomes["gave up (poll errors)"] += 1
                    return
                await self._backoff(min(failures, 4))
                continue
            kind = task.WhichOneof("kind")
            if kind == "train":
                await self.train(task.train)
                short = True
            elif kind == "wait":
                await asyncio.sleep(task.wait.retry_after_ms / 1000)
            else:
                await self.leave("federation done")
                self.rec.outcomes["done"] += 1
                return

    async def poll(self, short: bool) -> fleet_pb2.Task | None:
        wait_ms = 0 if short else int(max(0.0, min(self.spec.poll_wait_ms / 1000, self.remaining_s() - 1)) * 1000)
        t0 = time.perf_counter()
        try:
            task = await self.stub.PollTask(
                fleet_pb2.PollTaskRequest(max_wait_ms=wait_ms),
                timeout=self.timeout(wait_ms / 1000 + 30),
                metadata=self.md,
            )
        except grpc.aio.AioRpcError as err:
            self.rec.error("PollTask", err.code().name)
            if RETRY.delay(err, 0, self.jitter) is None:
                self.rec.problem(f"{self.client_id} PollTask: {err.code().name} {err.details()}")
            return None
        ms = (time.perf_counter() - t0) * 1000
        self.last_heartbeat = time.monotonic()  # an answered poll proves this client alive, as a Heartbeat would
        kind = task.WhichOneof("kind")
        if kind is None:
            self.rec.error("PollTask", "EMPTY_TASK")
            self.rec.problem(f"{self.client_id} PollTask: a Task with no kind")
            return None
        if short:
            self.rec.ok("PollTask", "PollTask", ms)
        else:
            self.rec.ok(f"PollTask.long.{kind.upper()}", "PollTask", ms)
            if kind == "wait":
                self.rec.latency_ms["PollTask.overshoot"].append(ms - wait_ms)
        if kind == "train":
            opened_ms = task.train.deadline_unix_ms - self.spec.round_timeout_ms
            dispatch = time.time() * 1000 - opened_ms
            self.rec.latency_ms["PollTask.dispatch"].append(dispatch)
            self.rec.dispatch.append((int(task.train.round), dispatch))
        return task

    async def heartbeat(self, busy: bool) -> None:
        self.last_heartbeat = time.monotonic()
        await self.unary(
            "Heartbeat",
            "Heartbeat",
            lambda: self.stub.Heartbeat(
                fleet_pb2.HeartbeatRequest(busy=busy), timeout=self.timeout(15), metadata=self.md
            ),
            retry=False,
        )

    async def leave(self, reason: str) -> None:
        await self.unary(
            "Leave",
            "Leave",
            lambda: self.stub.Leave(fleet_pb2.LeaveRequest(reason=reason), timeout=self.timeout(15), metadata=self.md),
        )

    async def download(self, ref: fleet_pb2.ArtifactRef) -> bytes | None:
        """The whole artifact, resuming at its offset after a transient error; digest verified."""
        buf = bytearray()
        for attempt in itertools.count():
            t0 = time.perf_counter()
            call = self.stub.DownloadArtifact(
                fleet_pb2.DownloadRequest(artifact_id=ref.artifact_id, offset=len(buf)),
                timeout=self.timeout(60),
                metadata=self.md,
            )
            try:
                async for chunk in call:
                    if chunk.offset != len(buf):
                        self.rec.error("DownloadArtifact", "BAD_OFFSET")
                        self.rec.problem(f"{self.client_id} download: chunk at {chunk.offset}, expected {len(buf)}")
                        return None
                    buf += chunk.data
            except grpc.aio.AioRpcError as err:
                if await self.retried("DownloadArtifact", err, attempt):
                    continue
                self.rec.problem(f"{self.client_id} download: {err.code().name} {err.details()}")
                return None
            self.rec.ok("DownloadArtifact", "DownloadArtifact", (time.perf_counter() - t0) * 1000)
            break
        data = bytes(buf)
        if len(data) != ref.size_bytes or hashlib.sha256(data).hexdigest() != ref.artifact_id:
            self.rec.error("DownloadArtifact", "DIGEST_MISMATCH")
            self.rec.problem(f"{self.client_id} download: {len(data)} bytes do not match {ref.artifact_id[:12]}")
            return None
        return data

    def make_update(self, train: fleet_pb2.TrainTask, trained_s: float) -> tuple[fleet_pb2.UpdateHeader, bytes]:
        """A valid update: the global state plus small noise (same keys, shapes, dtypes; finite)."""
        state = {}
        for key, value in self.model.items():
            if np.issubdtype(value.dtype, np.floating):
                state[key] = (value + 1e-3 * self.rng.standard_normal(value.shape)).astype(value.dtype)
            else:  # counters (BatchNorm's num_batches_tracked) advance by the local steps
                state[key] = value + np.asarray(train.config.local_steps, dtype=value.dtype)
        payload = bundle_to_bytes(encode_state(state, Encoding()))
        num_examples = int(self.rng.integers(32, 641))
        label_counts = self.rng.multinomial(num_examples, self.rng.dirichlet(np.full(N_CLASSES, 0.5)))
        header = fleet_pb2.UpdateHeader(
            round=train.round,
            task_id=train.task_id,
            idempotency_key=f"{self.client_id}:{train.round}:{train.task_id}",
            num_examples=num_examples,
            label_counts=[int(c) for c in label_counts],
            payload_bytes=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            metrics={"loss": float(self.rng.uniform(0.2, 2.0))},
            train_seconds=trained_s,
        )
        return header, payload

    async def train(self, train: fleet_pb2.TrainTask) -> None:
        ref = train.global_model
        if ref.artifact_id != self.model_sha:
            data = await self.download(ref)
            if data is None:
                return
            self.model, self.model_sha = decode_state(bundle_from_bytes(data)), ref.artifact_id
        for extra in train.extra_artifacts:  # none for FedAvg; fetched and verified if a strategy sends any
            if await self.download(extra) is None:
                return
        await self.heartbeat(busy=True)
        trained_s = float(self.rng.uniform(0, 2 * self.spec.train_s))
        await asyncio.sleep(trained_s)
        header, payload = self.make_update(train, trained_s)
        msgs = [fleet_pb2.UploadMessage(header=header)]
        msgs += [
            fleet_pb2.UploadMessage(chunk=payload[i : i + DEFAULT_CHUNK_BYTES])
            for i in range(0, len(payload), DEFAULT_CHUNK_BYTES)
        ]
        for attempt in itertools.count():  # a retry reuses the idempotency key: counted once
            t0 = time.perf_counter()
            try:
                ack = await self.stub.UploadUpdate(iter(msgs), timeout=self.timeout(60), metadata=self.md)
            except grpc.aio.AioRpcError as err:
                if await self.retried("UploadUpdate", err, attempt):
                    continue
                self.rec.refused.append(
                    {
                        "client_id": self.client_id,
                        "round": int(train.round),
                        "code": err.code().name,
                        "details": err.details(),
                    }
                )
                self.rec.problem(f"{self.client_id} upload round {train.round}: {err.code().name} {err.details()}")
                return
            self.rec.ok("UploadUpdate", "UploadUpdate", (time.perf_counter() - t0) * 1000)
            if ack.accepted:
                self.rec.accepted.append(
                    {
                        "client_id": self.client_id,
                        "round": int(ack.round),
                        "num_examples": int(header.num_examples),
                        "duplicate": ack.duplicate,
                        "received_bytes": int(ack.received_bytes),
                    }
                )
            else:
                self.rec.refused.append(
                    {"client_id": self.client_id, "round": int(train.round), "code": "OK_NOT_ACCEPTED", "details": ""}
                )
            return


async def _loop_lag(rec: Recorder, stop: asyncio.Event) -> None:
    """How late this worker's event loop wakes up: large values mean the load generator is starved."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.1)
        rec.loop_lag_ms.append(max(0.0, (time.perf_counter() - t0 - 0.1) * 1000))


async def _run_worker(spec: WorkerSpec) -> Recorder:
    rec = Recorder(spec.start_unix)
    options = channel_options()
    if spec.channels == 0:
        # Without this, channels with identical arguments share one subchannel (one TCP connection).
        options = [*options, ("grpc.use_local_subchannel_pool", 1)]
    n_channels = spec.count if spec.channels == 0 else min(spec.channels, spec.count)
    channels = [grpc.aio.insecure_channel(spec.address, options=options) for _ in range(n_channels)]
    clients = [SimClient(spec.first + k, spec, channels[k % n_channels], rec) for k in range(spec.count)]
    stop = asyncio.Event()
    lag = asyncio.create_task(_loop_lag(rec, stop))
    tasks = [asyncio.create_task(c.run()) for c in clients]
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, spec.deadline_unix - time.time() + 30))
    for t in pending:
        t.cancel()
        rec.outcomes["cancelled at the global timeout"] += 1
    await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if t.exception() is not None:
            rec.outcomes["crashed"] += 1
            rec.problem(f"client crashed: {type(t.exception()).__name__}: {t.exception()}")
    stop.set()
    await lag
    for ch in channels:
        await ch.close()
    return rec


def worker_main(spec: WorkerSpec) -> None:
    """Entry point of a worker process (spawned): runs its clients, writes its measurements as JSON."""
    t_cpu = time.process_time()
    rec = asyncio.run(_run_worker(spec))
    doc = {
        "worker": spec.worker,
        "clients": spec.count,
        "channels": spec.count if spec.channels == 0 else min(spec.channels, spec.count),
        "latency_ms": dict(rec.latency_ms),
        "errors": {k: dict(v) for k, v in rec.errors.items()},
        "retries": {k: dict(v) for k, v in rec.retries.items()},
        "per_second": {k: {str(s): n for s, n in v.items()} for k, v in rec.per_second.items()},
        "dispatch": rec.dispatch,
        "accepted": rec.accepted,
        "refused": rec.refused,
        "outcomes": dict(rec.outcomes),
        "problems": rec.problems,
        "loop_lag_ms": rec.loop_lag_ms,
        "cpu_seconds": time.process_time() - t_cpu,
        "torch_imported": "torch" in sys.modules,
    }
    Path(spec.result_path).write_text(json.dumps(doc))


# ============================================================================ the coordinator side
class ProcSampler(threading.Thread):
    """Samples a process's VmRSS, threads and CPU time from /proc every `interval` seconds."""

    def __init__(self, pid: int, t0: float, interval: float = RSS_INTERVAL_S) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.pid, self.t0, self.interval = pid, t0, interval
        self.samples: list[dict[str, float]] = []
        self._halt = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[str, float] | None:
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = {line.split(":", 1)[0]: line.split(":", 1)[1].split() for line in status.splitlines() if ":" in line}
        after_comm = stat.rsplit(")", 1)[1].split()  # utime, stime are fields 14, 15 (1-based) of stat
        cpu_s = (int(after_comm[11]) + int(after_comm[12])) / self._tick
        return {
            "t_s": round(time.time() - self.t0, 3),
            "rss_mib": int(fields["VmRSS"][0]) / 1024,
            "threads": int(fields["Threads"][0]),
            "cpu_s": cpu_s,
        }

    def run(self) -> None:
        while not self._halt.is_set():
            s = self.sample()
            if s is not None:
                self.samples.append(s)
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50_ms": math.nan, "p90_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan, "mean_ms": math.nan}
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(a.max()), 2),
        "mean_ms": round(float(a.mean()), 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--clients", type=int, default=1000, help="simulated clients")
    p.add_argument("--cohort", type=int, default=100, help="clients per round (= min_clients)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=4, help="client worker processes (grpc.aio, ~clients/workers each)")
    p.add_argument(
        "--channels",
        type=int,
        default=0,
        help="channels per worker shared round-robin by its clients; 0 = one channel per client",
    )
    p.add_argument(
        "--min-completed",
        type=int,
        default=None,
        help="updates a round needs at its deadline (default: the cohort, so a lost upload fails the round)",
    )
    p.add_argument("--round-timeout", type=float, default=180.0, help="round deadline, seconds (generous)")
    p.add_argument(
        "--poll-wait-ms",
        type=int,
        default=15_000,
        help="max_wait_ms of a long poll (edge_client uses 15 s; the server caps it at server.max_poll_wait_s)",
    )
    p.add_argument(
        "--train-seconds",
        type=float,
        default=1.0,
        help="mean simulated training time per task (uniform in [0, 2x]); no CPU is spent",
    )
    p.add_argument("--ramp", type=float, default=5.0, help="clients join at uniform times over this many seconds")
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="global limit, seconds: every client stops by then and the benchmark ends",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="work dir for coordinator state and logs (default: a new temp dir under runs/)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON, CSV and PNG go")
    args = p.parse_args(argv)
    if min(args.clients, args.cohort, args.rounds, args.workers) < 1:
        p.error("--clients, --cohort, --rounds and --workers must be >= 1")
    if args.cohort > args.clients:
        p.error(f"--cohort ({args.cohort}) exceeds --clients ({args.clients})")
    if args.min_completed is not None and not 1 <= args.min_completed <= args.cohort:
        p.error("--min-completed must be between 1 and --cohort")
    if args.channels < 0 or args.timeout <= 0 or args.ramp < 0 or args.train_seconds < 0 or args.poll_wait_ms < 0:
        p.error("--channels, --ramp, --train-seconds and --poll-wait-ms must be >= 0, --timeout > 0")
    args.workers = min(args.workers, args.clients)
    return args


def build_config(args: argparse.Namespace, state_dir: Path) -> CoordinatorConfig:
    return parse_config(
        {
            "state_dir": str(state_dir),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": "fedavg",
                "rounds": args.rounds,
                "clients_per_round": args.cohort,
                "min_clients": args.cohort,
                "min_completed": args.min_completed or args.cohort,
                "round_timeout_s": args.round_timeout,
                "seed": args.seed,
            },
            # Evaluate only after the last round: this benchmark is about the wire, not accuracy.
            "data": {"test_data_dir": "builtin", "evaluate_every": 1_000_000},
            # Every simulated device is on this machine's address: the per-peer Join rate and
            # never-called cap would meter the whole fleet as one attacker.
            "auth": {
                "enrollment_tokens": [TOKEN],
                "joins_per_peer_per_second": 0,
                "max_unproven_clients": max(1_000, args.clients),
            },
        }
    )


def run_workers(args: argparse.Namespace, address: str, out: Path, start_unix: float) -> list[dict[str, Any]]:
    """Spawns the worker processes (no fork: gRPC's threads do not survive one) and collects their JSON."""
    ctx = multiprocessing.get_context("spawn")
    deadline = start_unix + args.timeout
    base, extra = divmod(args.clients, args.workers)
    procs, paths, first = [], [], 0
    for w in range(args.workers):
        count = base + (1 if w < extra else 0)
        path = out / f"worker-{w}.json"
        path.unlink(missing_ok=True)
        spec = WorkerSpec(
            worker=w,
            address=address,
            first=first,
            count=count,
            channels=args.channels,
            start_unix=start_unix,
            deadline_unix=deadline,
            ramp_s=args.ramp,
            poll_wait_ms=args.poll_wait_ms,
            train_s=args.train_seconds,
            round_timeout_ms=int(args.round_timeout * 1000),
            seed=args.seed,
            result_path=str(path),
        )
        proc = ctx.Process(target=worker_main, args=(spec,), name=f"load-worker-{w}", daemon=True)
        proc.start()
        procs.append(proc)
        paths.append(path)
        first += count
    results = []
    for proc, path in zip(procs, paths, strict=False):
        proc.join(max(1.0, deadline - time.time() + 90))
        if proc.is_alive():  # past the global timeout and its grace: end this worker (ours, by its handle)
            proc.terminate()
            proc.join(10)
        if path.exists():
            results.append(json.loads(path.read_text()))
        else:
            results.append({"worker": len(results), "missing": True, "exitcode": proc.exitcode})
    return results


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    latency: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, Counter[str]] = defaultdict(Counter)
    retries: dict[str, Counter[str]] = defaultdict(Counter)
    per_second: dict[str, Counter[int]] = defaultdict(Counter)
    merged: dict[str, Any] = {
        "accepted": [],
        "refused": [],
        "dispatch": [],
        "outcomes": Counter(),
        "problems": [],
        "loop_lag_ms": [],
        "cpu_seconds": [],
        "torch_imported": False,
        "channels": 0,
        "missing_workers": 0,
    }
    for r in results:
        if r.get("missing"):
            merged["missing_workers"] += 1
            continue
        for k, v in r["latency_ms"].items():
            latency[k] += v
        for k, v in r["errors"].items():
            errors[k].update(v)
        for k, v in r["retries"].items():
            retries[k].update(v)
        for k, v in r["per_second"].items():
            per_second[k].update({int(s): n for s, n in v.items()})
        for k in ("accepted", "refused", "dispatch", "problems", "loop_lag_ms"):
            merged[k] += r[k]
        merged["outcomes"].update(r["outcomes"])
        merged["cpu_seconds"].append(round(r["cpu_seconds"], 1))
        merged["torch_imported"] |= r["torch_imported"]
        merged["channels"] += r["channels"]
    merged.update(latency=latency, errors=errors, retries=retries, per_second=per_second)
    return merged


def check_ledger(rows: list[control_pb2.LedgerRow], accepted: list[dict[str, Any]]) -> dict[str, Any]:
    """Every acknowledged update must be a 'completed' entry of a committed round, with its num_examples."""
    completed = {(r.round, c.client_id): c for r in rows for c in r.clients if c.outcome == "completed"}
    acked = {(a["round"], a["client_id"]): a for a in accepted}
    lost = sorted(k for k in acked if k not in completed)
    mismatched = sorted(
        k for k, a in acked.items() if k in completed and completed[k].num_examples != a["num_examples"]
    )
    unacked = sorted(k for k in completed if k not in acked)
    return {
        "lost": lost,
        "num_examples_mismatch": mismatched,
        "completed_without_ack": unacked,
        "ledger_completed": sum(r.completed for r in rows),
        "ledger_rejected": sum(r.rejected for r in rows),
        "ledger_dropped": sum(r.dropped for r in rows),
    }


def read_attempts(state_dir: Path) -> dict[int, int]:
    """Round -> attempt that committed (from the coordinator's ledger.jsonl; 0 = first try)."""
    path = state_dir / "ledger.jsonl"
    if not path.exists():
        return {}
    return {
        json.loads(line)["round"]: int(json.loads(line).get("attempt", 0))
        for line in path.read_text().splitlines()
        if line.strip()
    }


def summarize(
    args: argparse.Namespace,
    m: dict[str, Any],
    rows: list[control_pb2.LedgerRow],
    ledger: dict[str, Any],
    samples: list[dict[str, float]],
    start_unix: float,
    attempts: dict[int, int],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    flat, rpcs = [], {}
    for key, rpc, what in MEASURES:
        stats = percentiles(m["latency"].get(key, []))
        count = len(m["latency"].get(key, []))
        entry = {"count": count, **stats}
        if key in RPC_NAMES:  # errors belong to the RPC, reported on its main line
            entry["errors"] = sum(m["errors"].get(rpc, {}).values())
            entry["errors_by_code"] = dict(m["errors"].get(rpc, {}))
        rpcs[key] = entry
        flat.append(
            {
                "measure": key,
                "rpc": rpc,
                "what": what.strip(),
                "derived": key in DERIVED,
                "count": count,
                "errors": entry.get("errors", ""),
                "errors_by_code": " ".join(f"{c}:{n}" for c, n in sorted(entry.get("errors_by_code", {}).items())),
                **stats,
            }
        )
    total_by_rpc = {rpc: sum(m["per_second"].get(rpc, Counter()).values()) for rpc in RPC_NAMES}
    seconds = sorted({s for c in m["per_second"].values() for s in c})
    active_s = (seconds[-1] - seconds[0] + 1) if seconds else math.nan
    rpcs_total = sum(total_by_rpc.values())
    opened = [r.opened_unix_ms for r in rows]
    committed = [r.committed_unix_ms for r in rows]
    fed_s = (max(committed) - min(opened)) / 1000 if rows else math.nan
    round_s = [r.round_seconds for r in rows]
    accepted_unique = len({(a["round"], a["client_id"]) for a in m["accepted"]})
    rss = [s["rss_mib"] for s in samples]
    cpu = [s["cpu_s"] for s in samples]
    busy_s = (samples[-1]["t_s"] - samples[0]["t_s"]) if len(samples) > 1 else math.nan
    summary = {
        "clients": args.clients,
        "cohort": args.cohort,
        "rounds": args.rounds,
        "workers": args.workers,
        "channel_mode": (
            "one channel (TCP connection) per client"
            if args.channels == 0
            else f"{args.channels} channel(s) per worker, shared round-robin"
        ),
        "channels_total": m["channels"],
        "rounds_committed": len(rows),
        "failed_round_attempts": sum(attempts.values()),
        "seconds_per_round_mean": round(float(np.mean(round_s)), 3) if round_s else None,
        "seconds_per_round_max": round(float(np.max(round_s)), 3) if round_s else None,
        "federation_seconds": round(fed_s, 2),
        "accepted_updates": accepted_unique,
        "duplicate_acks": sum(a["duplicate"] for a in m["accepted"]),
        "rejected_updates": len(m["refused"]),
        "ledger_completed": ledger["ledger_completed"],
        "ledger_rejected": ledger["ledger_rejected"],
        "ledger_dropped": ledger["ledger_dropped"],
        "lost_updates": len(ledger["lost"]),
        "lost_update_keys": [list(k) for k in ledger["lost"][:20]],
        "num_examples_mismatch": len(ledger["num_examples_mismatch"]),
        "completed_without_ack": len(ledger["completed_without_ack"]),
        "rpcs_total": rpcs_total,
        "rpcs_by_name": total_by_rpc,
        "rpcs_per_s": round(rpcs_total / active_s, 1) if seconds else None,
        "active_seconds": active_s,
        "updates_per_s": round(accepted_unique / fed_s, 2) if rows and fed_s > 0 else None,
        "peak_rss_mib": round(max(rss), 1) if rss else None,
        "rss_before_clients_mib": None,
        "rss_end_mib": round(rss[-1], 1) if rss else None,
        "coordinator_cpu_seconds": round(cpu[-1] - cpu[0], 1) if len(cpu) > 1 else None,
        "coordinator_cpu_mean_pct": round(100 * (cpu[-1] - cpu[0]) / busy_s, 1)
        if len(cpu) > 1 and busy_s > 0
        else None,
        "peak_coordinator_threads": max(int(s["threads"]) for s in samples) if samples else None,
        "client_outcomes": dict(m["outcomes"]),
        "client_problems": m["problems"][:20],
        "worker_cpu_seconds": m["cpu_seconds"],
        "worker_loop_lag_p99_ms": percentiles(m["loop_lag_ms"])["p99_ms"],
        "missing_workers": m["missing_workers"],
        "torch_imported_by_clients": m["torch_imported"],
        "rpcs": rpcs,
        "errors_by_rpc": {k: dict(v) for k, v in m["errors"].items()},
        "retries_by_rpc": {k: dict(v) for k, v in m["retries"].items()},
        "round_details": [
            {
                "round": r.round,
                "attempt": attempts.get(r.round, 0),
                "cohort_size": r.cohort_size,
                "completed": r.completed,
                "dropped": r.dropped,
                "rejected": r.rejected,
                "round_seconds": r.round_seconds,
                "wait_seconds": r.wait_seconds,
                "aggregate_seconds": r.aggregate_seconds,
                "evaluate_seconds": r.evaluate_seconds,
                "opened_s": round(r.opened_unix_ms / 1000 - start_unix, 3),
                "committed_s": round(r.committed_unix_ms / 1000 - start_unix, 3),
                "dispatch_p50_ms": percentiles([d for rr, d in m["dispatch"] if rr == r.round])["p50_ms"],
                "dispatch_max_ms": percentiles([d for rr, d in m["dispatch"] if rr == r.round])["max_ms"],
            }
            for r in rows
        ],
    }
    return summary, flat


def fmt_ms(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def print_tables(console: Any, flat: list[dict[str, Any]], s: dict[str, Any], title: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("RPC / measure", "count", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms"):
        table.add_column(col, justify="left" if col == "RPC / measure" else "right")
    for row, (_, _, what) in zip(flat, MEASURES, strict=False):
        table.add_row(
            what,
            f"{row['count']:,}",
            str(row["errors"]) if row["errors"] != "" else "",
            fmt_ms(row["p50_ms"]),
            fmt_ms(row["p90_ms"]),
            fmt_ms(row["p99_ms"]),
            fmt_ms(row["max_ms"]),
        )
    console.print(table)

    summary = Table(title="Summary", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    opt = lambda v, f="{}": "—" if v is None else f.format(v)  # noqa: E731
    summary.add_row(
        "clients / cohort / workers / channels",
        f"{s['clients']} / {s['cohort']} / {s['workers']} / {s['channels_total']} ({s['channel_mode']})",
    )
    summary.add_row(
        "rounds committed (failed attempts)", f"{s['rounds_committed']}/{s['rounds']} ({s['failed_round_attempts']})"
    )
    summary.add_row(
        "seconds per round: mean / max",
        f"{opt(s['seconds_per_round_mean'], '{:.2f}')} / {opt(s['seconds_per_round_max'], '{:.2f}')}",
    )
    summary.add_row(
        "updates accepted / rejected / lost", f"{s['accepted_updates']} / {s['rejected_updates']} / {s['lost_updates']}"
    )
    summary.add_row(
        "ledger: completed / rejected / dropped",
        f"{s['ledger_completed']} / {s['ledger_rejected']} / {s['ledger_dropped']}",
    )
    summary.add_row(
        "throughput: RPCs/s (active window) / updates/s (first open -> last commit)",
        f"{opt(s['rpcs_per_s'])} ({s['rpcs_total']:,} RPCs in {s['active_seconds']} s) / {opt(s['updates_per_s'])}",
    )
    summary.add_row(
        "coordinator RSS: before clients / peak / end (MiB)",
        f"{opt(s['rss_before_clients_mib'], '{:.0f}')} / {opt(s['peak_rss_mib'], '{:.0f}')} / "
        f"{opt(s['rss_end_mib'], '{:.0f}')}",
    )
    summary.add_row(
        "coordinator CPU: seconds / mean % of one core / peak threads",
        f"{opt(s['coordinator_cpu_seconds'])} / {opt(s['coordinator_cpu_mean_pct'])} / "
        f"{opt(s['peak_coordinator_threads'])}",
    )
    summary.add_row(
        "client workers: CPU seconds each / event-loop lag p99 ms",
        f"{s['worker_cpu_seconds']} / {fmt_ms(s['worker_loop_lag_p99_ms'])}",
    )
    by_rpc = s["retries_by_rpc"].items()
    retried = [f"{rpc}: " + ", ".join(f"{c} x{n}" for c, n in sorted(v.items())) for rpc, v in by_rpc]
    summary.add_row("retried refusals (rpc: code x n)", "; ".join(sorted(retried)) or "none")
    summary.add_row("client outcomes", ", ".join(f"{k}: {v}" for k, v in sorted(s["client_outcomes"].items())))
    summary.add_row("wall time (coordinator start -> results)", f"{s['wall_seconds']:.1f} s")
    console.print(summary)


def plot(
    samples: list[dict[str, float]],
    flat: list[dict[str, Any]],
    per_second: dict[str, Counter[int]],
    s: dict[str, Any],
    path: Path,
    title: str,
) -> Path:
    import matplotlib.pyplot as plt  # fedgen.coordinator.plots selected the Agg backend

    fig, (ax_rss, ax_lat, ax_tp) = plt.subplots(1, 3, figsize=(18, 5))
    t = [x["t_s"] for x in samples]
    ax_rss.plot(t, [x["rss_mib"] for x in samples], color="tab:blue", label="VmRSS")
    ax_rss.set(
        xlabel="seconds since coordinator start",
        ylabel="coordinator RSS (MiB)",
        title=f"coordinator memory and CPU (every {RSS_INTERVAL_S} s)",
    )
    ax_rss.set_ylim(bottom=0)
    for r in s["round_details"]:
        ax_rss.axvspan(r["opened_s"], r["committed_s"], color="tab:green", alpha=0.12)
    ax_cpu = ax_rss.twinx()
    if len(samples) > 1:
        cpu_pct = [
            100 * (b["cpu_s"] - a["cpu_s"]) / max(1e-6, b["t_s"] - a["t_s"]) for a, b in itertools.pairwise(samples)
        ]
        ax_cpu.plot(t[1:], cpu_pct, color="tab:red", alpha=0.5, linewidth=0.8, label="CPU % of one core")
    ax_cpu.set_ylabel("coordinator CPU (% of one core)")
    ax_cpu.set_ylim(bottom=0)
    handles = ax_rss.get_legend_handles_labels()[0] + ax_cpu.get_legend_handles_labels()[0]
    ax_rss.legend(
        [*handles, plt.Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.12)],
        [h.get_label() for h in handles] + ["round open -> committed"],
        fontsize=8,
        loc="lower right",
    )
    ax_rss.grid(alpha=0.3)

    shown = [r for r in flat if r["count"] and not math.isnan(r["p50_ms"])]
    y = np.arange(len(shown))
    ax_lat.barh(y - 0.2, [max(0.01, r["p50_ms"]) for r in shown], height=0.4, label="p50")
    ax_lat.barh(y + 0.2, [max(0.01, r["p99_ms"]) for r in shown], height=0.4, label="p99")
    ax_lat.set_yticks(y, [r["measure"] for r in shown], fontsize=8)
    ax_lat.invert_yaxis()
    ax_lat.set_xscale("log")
    ax_lat.set(xlabel="ms (log)", title="latency per RPC (long polls as is; see JSON)")
    ax_lat.legend(fontsize=8)
    ax_lat.grid(alpha=0.3, axis="x")

    horizon = max((sec for c in per_second.values() for sec in c), default=0) + 2  # the last second drawn whole
    xs = np.arange(horizon)
    stacks = [np.array([per_second.get(rpc, Counter()).get(int(x), 0) for x in xs]) for rpc in RPC_NAMES]
    ax_tp.stackplot(xs, *stacks, labels=RPC_NAMES, step="post")
    ax_tp.set(
        xlabel="seconds since coordinator start",
        ylabel="RPCs completed per second",
        title="throughput (client side, all workers)",
    )
    ax_tp.legend(fontsize=8, loc="upper right")
    ax_tp.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from fedgen.coordinator.local import LocalFederation

    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    out = args.out or Path(tempfile.mkdtemp(prefix=f"{NAME}-", dir=_runs_dir()))
    state_dir = out / "state"
    if state_dir.exists() and any(state_dir.iterdir()):
        console.print(f"[red]{NAME}: {state_dir} already holds coordinator state; pass a fresh --out[/red]")
        return 2
    try:
        config = build_config(args, state_dir)
    except ConfigError as err:
        console.print(f"[red]{NAME}: {err}[/red]")
        return 2
    start_unix = time.time()
    sampler: ProcSampler | None = None
    with LocalFederation(config, [], out) as fed:
        try:
            fed.start_coordinator()
        except (RuntimeError, TimeoutError) as err:
            console.print(f"[red]{NAME}: {err}[/red]")
            return 1
        assert fed.coordinator_proc is not None
        sampler = ProcSampler(fed.coordinator_proc.pid, start_unix)
        before = sampler.sample()
        sampler.start()
        console.print(
            f"{NAME}: coordinator pid {fed.coordinator_proc.pid} on {fed.address}; {args.clients} clients "
            f"in {args.workers} worker processes, cohort {args.cohort}, {args.rounds} rounds; work dir {out}"
        )
        results = run_workers(args, fed.address, out, start_unix)
        merged = merge(results)
        try:
            rows = fed.ledger()
        except grpc.RpcError as err:
            console.print(f"[red]{NAME}: GetLedger failed: {err.code().name} {err.details()}[/red]")
            rows = []
        sampler.stop()
    coord_code = fed.coordinator_proc.returncode if fed.coordinator_proc is not None else None
    attempts = read_attempts(state_dir)
    ledger = check_ledger(rows, merged["accepted"])
    summary, flat = summarize(args, merged, rows, ledger, sampler.samples, start_unix, attempts)
    summary["rss_before_clients_mib"] = round(before["rss_mib"], 1) if before else None
    summary["wall_seconds"] = round(time.time() - start_unix, 1)
    summary["coordinator_exit_code"] = coord_code
    print_tables(
        console,
        flat,
        summary,
        f"Load: {args.clients} clients ({args.workers} worker processes, {summary['channel_mode']}), "
        f"cohort {args.cohort}, {args.rounds} rounds, FedAvg, one coordinator process over loopback",
    )

    bench_config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    bench_config["out"] = str(out)
    extra = {
        **summary,
        "notes": {
            "PollTask": "PollTask = non-waiting polls (max_wait_ms=0: the first poll after Join and after each "
            "upload). Long polls are held by the server until there is a task, so their time is waiting "
            "by design; they are reported as is by outcome (PollTask.long.*), and two derived measures "
            "time the server: PollTask.dispatch = round opened (TrainTask.deadline_unix_ms - "
            "round_timeout) -> TRAIN received, PollTask.overshoot = time a WAIT long poll was held "
            "beyond its max_wait_ms.",
            "latency": "client-side wall time per call (a stream: call -> last message), successful calls only; "
            "failed calls are counted in errors by status code. Clients and coordinator share the "
            "machine's cores (worker_loop_lag_p99_ms says how late the clients' own loops ran).",
            "lost_updates": "acknowledged as accepted by UploadUpdate but not a 'completed' entry of that round "
            "in Control GetLedger",
            "rejected_updates": "uploads that ended with a non-transient status (after retries) or an ack "
            "with accepted=false",
        },
        "rss_timeline": [[x["t_s"], round(x["rss_mib"], 2), round(x["cpu_s"], 2)] for x in sampler.samples],
        "rss_timeline_columns": ["t_s", "rss_mib", "coordinator_cpu_s"],
        "throughput_per_second": {
            rpc: {str(k): v for k, v in sorted(c.items())} for rpc, c in merged["per_second"].items()
        },
        "config": {"benchmark": bench_config, "coordinator": config.model_dump(mode="json")},
        "code": code_version(),
    }
    json_path = write_results(NAME, command_line(SCRIPT, argv), flat, extra, results_dir=args.results_dir)
    png = plot(
        sampler.samples,
        flat,
        merged["per_second"],
        summary,
        args.results_dir / f"{NAME}.png",
        f"{args.clients} simulated clients, cohort {args.cohort}, {args.rounds} rounds: "
        f"peak RSS {summary['peak_rss_mib']} MiB, lost {summary['lost_updates']}, "
        f"rejected {summary['rejected_updates']}",
    )
    console.print(f"results: {json_path}, {json_path.with_suffix('.csv')}, {png}\nlogs and state: {out}")

    problems = []
    if summary["rounds_committed"] != args.rounds:
        problems.append(f"{summary['rounds_committed']} of {args.rounds} rounds committed")
    if summary["lost_updates"]:
        problems.append(f"{summary['lost_updates']} lost update(s): {summary['lost_update_keys']}")
    if summary["rejected_updates"] or summary["ledger_rejected"]:
        problems.append(f"{summary['rejected_updates']} rejected upload(s), {summary['ledger_rejected']} in the ledger")
    if summary["client_outcomes"].get("done", 0) != args.clients:
        problems.append(f"client outcomes {summary['client_outcomes']}")
    if merged["torch_imported"]:
        problems.append("a client worker imported torch")
    if problems:
        console.print(
            f"[red]{NAME}: {'; '.join(problems)}; see {out}/coordinator.log; "
            f"client problems: {summary['client_problems'][:5]}[/red]"
        )
        return 1
    return 0


def code_version() -> dict[str, Any]:
    """The commit measured, and which server-side files differed from it (the figures are for that tree)."""

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    status = git("status", "--porcelain", "--", "coordinator", "fedcore", "export", "proto")
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "uncommitted_server_files": [line[3:] for line in status.splitlines() if line.strip()],
    }


def _runs_dir() -> Path:
    path = REPO_ROOT / "runs"
    path.mkdir(exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
