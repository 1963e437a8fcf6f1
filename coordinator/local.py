"""A whole federation on this machine: a coordinator process and N edge-client processes.

The demo, the benchmarks and the integration tests all use this, so they exercise the
same wire a deployment does: real processes, real sockets, nothing shared in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedgen.coordinator.config import CoordinatorConfig
from fedgen.core.data import Dataset, dirichlet_partition, label_histogram, label_restricted_test_split, save_shard
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.v1 import control_pb2, control_pb2_grpc

_LOGGER = logging.getLogger(__name__)


def toml_dumps(data: dict[str, Any]) -> str:
    """Minimal TOML writer for our config shape (nested tables of scalars and lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    def table(prefix: str, data: dict[str, Any]) -> list[str]:
        lines = [f"\n[{prefix}]"] if prefix else []
        lines += [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict) and v is not None]
        for key, sub in data.items():
            if isinstance(sub, dict):
                lines += table(f"{prefix}.{key}" if prefix else key, sub)
        return lines

    return "\n".join(table("", data)) + "\n"


def write_shards(
    train: Dataset,
    out_dir: Path,
    n_clients: int,
    alpha: float,
    seed: int,
    samples_per_class: int | None = None,
    test: Dataset | None = None,
    test_parts: list[np.ndarray] | None = None,
) -> tuple[list[Path], np.ndarray]:
    """Dirichlet-partitions `train` into one shard file per client; returns paths and label histogram.

    With `test` (and no explicit `test_parts`), each shard also gets FedGen's label-restricted
    local test split: test images of the labels that client trains on, disjoint across clients.
    """
    parts = dirichlet_partition(train.labels, n_clients, alpha, seed, samples_per_class=samples_per_class)
    if test is not None and test_parts is None:
        test_parts = label_restricted_test_split(test.labels, [train.labels[p] for p in parts], seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, idx in enumerate(parts):
        path = out_dir / f"client-{k:02d}.npz"
        local_test = test.subset(test_parts[k]) if test is not None and test_parts is not None else None
        save_shard(path, train.subset(idx), local_test)
        paths.append(path)
    return paths, label_histogram(train.labels, parts, int(train.labels.max()) + 1)


@dataclass
class LocalFederation:
    """Owns the processes of one local federation; use as a context manager."""

    config: CoordinatorConfig
    shards: list[Path]
    work_dir: Path
    client_threads: int = 1
    client_log_level: str = "WARNING"
    extra_client_args: list[str] = field(default_factory=list)
    # Arguments for one client only (index -> args), e.g. a memory budget or a readiness probe.
    per_client_args: dict[int, list[str]] = field(default_factory=dict)
    # Where the clients connect when not straight to the coordinator (e.g. a reverse proxy),
    # for all of them or per client (index -> address, e.g. one emulated link each).
    client_address: str | None = None
    per_client_address: dict[int, str] = field(default_factory=dict)
    # For this process's Control channel when the coordinator serves TLS.
    control_credentials: grpc.ChannelCredentials | None = None
    control_server_name: str = ""
    coordinator_proc: subprocess.Popen[bytes] | None = None
    client_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_coordinator(self, timeout_s: float = 60.0) -> int:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.work_dir / "coordinator.toml"
        config_path.write_text(toml_dumps(self.config.model_dump(mode="json")))
        port_file = self.work_dir / "coordinator.port"
        port_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "fedgen.coordinator",
            "serve",
            "--config",
            str(config_path),
            "--port-file",
            str(port_file),
        ]
        with open(self.work_dir / "coordinator.log", "ab") as log:  # the child keeps its own descriptor
            self.coordinator_proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_child_env())
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self.coordinator_proc.poll() is not None:
                raise RuntimeError(
                    f"coordinator exited with {self.coordinator_proc.returncode}; "
                    f"see {self.work_dir / 'coordinator.log'}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError("coordinator did not report its port in time")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self.port

    def start_clients(self, token: str | None = None) -> None:
        for k in range(len(self.shards)):
            self.client_procs.append(self._start_client(k, token))

    def restart_client(self, k: int, token: str | None = None) -> None:
        """Starts client k again (same id, shard and cache), e.g. after the test killed it."""
        self.client_procs[k] = self._start_client(k, token)

    def _start_client(self, k: int, token: str | None) -> subprocess.Popen[bytes]:
        token = token or self.config.auth.enrollment_tokens[0]
        shard = self.shards[k]
        client_id = shard.stem
        with open(self.work_dir / f"{client_id}.log", "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fedgen.edge",
                    "--coordinator",
                    self.per_client_address.get(k) or self.client_address or self.address,
                    "--data",
                    str(shard),
                    "--token",
                    token,
                    "--client-id",
                    client_id,
                    "--threads",
                    str(self.client_threads),
                    "--cache-dir",
                    str(self.work_dir / "cache" / client_id),
                    "--seed",
                    str(self.config.federation.seed + k),
                    "--log-level",
                    self.client_log_level,
                    "--task",
                    self.config.task.name,
                    *self.extra_client_args,
                    *self.per_client_args.get(k, []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
            )

    def channel(self) -> grpc.Channel:
        options = channel_options()
        if self.control_credentials is None:
            return grpc.insecure_channel(self.address, options)
        if self.control_server_name:
            options.append(("grpc.ssl_target_name_override", self.control_server_name))
        return grpc.secure_channel(self.address, self.control_credentials, options)

    def control(self, channel: grpc.Channel) -> control_pb2_grpc.ControlStub:
        return control_pb2_grpc.ControlStub(channel)

    def control_metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.config.auth.operator_token
        return bearer_metadata(token) if token else ()

    def events(self, timeout_s: float) -> Iterator[control_pb2.RoundEvent]:
        """Round events from the Control stream until the federation finishes (or timeout)."""
        with self.channel() as channel:
            stub = self.control(channel)
            yield from stub.StreamEvents(
                control_pb2.StreamEventsRequest(), timeout=timeout_s, metadata=self.control_metadata()
            )

    def ledger(self) -> list[control_pb2.LedgerRow]:
        with self.channel() as channel:
            return list(
                self.control(channel)
                .GetLedger(control_pb2.GetLedgerRequest(), timeout=30, metadata=self.control_metadata())
                .rows
            )

    def wait_clients(self, timeout_s: float = 60.0) -> list[int | None]:
        deadline = time.monotonic() + timeout_s
        for proc in self.client_procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
        return [p.poll() for p in self.client_procs]

    def close(self) -> None:
        for proc in self.client_procs:
            _terminate(proc)
        if self.coordinator_proc is not None:
            _terminate(self.coordinator_proc)


def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Each process gets one core's worth of math threads; N processes share 2 cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env
