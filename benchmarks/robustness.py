"""Robustness: what each defence of ``[robust]`` buys against hostile clients, and what it costs.

Section 1 (model attacks): a real federation (a coordinator process, 10 honest edge-client
processes on real MNIST, real sockets) plus 0, 1 or 3 attacking clients that speak the protocol
from this process. Each attacker is sampled every round and uploads, in place of training:
  scale  the global model times 1e30 (finite, valid, accepted by a plain mean),
  zeros  an all-zero model,
  stale  the first global model it ever received, sent back every round.
For every defence (mean = no defence, median, trimmed-mean, multi-krum, clip = norm clipping
of the update) the table gives the final and best test accuracy of the global model, how many
updates the defence excluded or clipped, how many rounds kept the previous model, and its cost
with no attacker: accuracy, and aggregation CPU time per round (measured in the coordinator).

Section 2 (resource attacks): one long FedAvg federation of 10 honest clients; each attack runs
for a window while this script samples the coordinator's RSS and counts the rounds the honest
clients commit, against a quiet window before it.

    python benchmarks/robustness.py      # the default matrix (about 30 min on 2 cores)
    python benchmarks/robustness.py --attackers 1,3 --fedgen-attacks scale,zeros,stale \
        --fedgen-defences mean,median,clip

Writes benchmarks/results/robustness.{json,csv}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from common import RESULTS_DIR, BenchmarkError, command_line, shared_data_dir, write_results
from rich.console import Console
from rich.table import Table

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.ledger import read_jsonl
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.transport import bearer_metadata, channel_options
from fedgen.export.codec import Encoding, State, bundle_from_bytes, bundle_to_bytes, decode_state, encode_state
from fedgen.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc

SCRIPT = "benchmarks/robustness.py"
TOKEN = "robustness-benchmark-token"
OPERATOR = "robustness-operator-token"
HONEST = 10
DEFENCES: dict[str, dict[str, Any]] = {
    "mean": {},
    "median": {"aggregator": "median"},
    "trimmed-mean": {"aggregator": "trimmed-mean", "trim_fraction": 0.3},
    "multi-krum": {"aggregator": "multi-krum", "byzantine": 3},
    "clip": {"clip_norm": 5.0},
}
ATTACKS: dict[str, Callable[[State, State], State]] = {
    # Times 1e30, held inside fp32's range (a mean-poisoned model scaled again would overflow to
    # Inf, and a non-finite update is refused at upload: this one is finite, valid and accepted).
    "scale": lambda model, _first: {
        k: (v.astype(np.float64) * 1e30).clip(-1e38, 1e38).astype(v.dtype) if v.dtype.kind == "f" else v
        for k, v in model.items()
    },
    "zeros": lambda model, _first: {k: np.zeros_like(v) for k, v in model.items()},
    "stale": lambda _model, first: first,
}


class Attacker(threading.Thread):
    """A protocol-level client that uploads `attack(global model, first model)` every round."""

    def __init__(self, address: str, name: str, attack: Callable[[State, State], State]) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(address, channel_options())
        self.stub = fleet_pb2_grpc.FleetStub(self.channel)
        reply = self.stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id=name), timeout=30)
        self.md = bearer_metadata(reply.credential)
        self.attack = attack
        self.first: State | None = None
        self.uploads = 0
        self.stop = threading.Event()

    def run(self) -> None:
        done: set[str] = set()  # task ids: a round that is redone gets a new task
        while not self.stop.is_set():
            try:
                task = self.stub.PollTask(fleet_pb2.PollTaskRequest(max_wait_ms=2000), timeout=30, metadata=self.md)
                if task.HasField("done"):
                    return
                if not task.HasField("train") or task.train.task_id in done:
                    continue
                done.add(task.train.task_id)
                self._attack(task.train)
            except grpc.RpcError:
                if self.stop.wait(0.5):
                    return

    def _attack(self, train: fleet_pb2.TrainTask) -> None:
        request = fleet_pb2.DownloadRequest(artifact_id=train.global_model.artifact_id)
        chunks = list(self.stub.DownloadArtifact(request, timeout=60, metadata=self.md))
        model = decode_state(bundle_from_bytes(b"".join(c.data for c in chunks)))
        if self.first is None:
            self.first = model
        payload = bundle_to_bytes(encode_state(self.attack(model, self.first), Encoding()))
        header = fleet_pb2.UpdateHeader(
            round=train.round,
            task_id=train.task_id,
            idempotency_key=f"{train.task_id}:attack",
            # As many examples as 10 local steps of batch 32 could use: the most the coordinator accepts.
            num_examples=320,
            label_counts=[32] * 10,
            payload_bytes=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
        )
        messages = [fleet_pb2.UploadMessage(header=header)]
        messages += [fleet_pb2.UploadMessage(chunk=payload[i : i + 65536]) for i in range(0, len(payload), 65536)]
        self.stub.UploadUpdate(iter(messages), timeout=60, metadata=self.md)
        self.uploads += 1


def _config(
    work: Path, mnist: Path, strategy: str, rounds: int, attackers: int, robust: dict[str, Any], evaluate_every: int = 1
) -> Any:
    cohort = HONEST + attackers
    return parse_config(
        {
            "state_dir": str(work / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": strategy,
                "rounds": rounds,
                "clients_per_round": cohort,
                "min_clients": cohort,
                # The honest clients are enough to commit: an attacker's refused upload (e.g. by
                # the non-finite check) does not hold the round up.
                "min_completed": HONEST,
                "round_timeout_s": 300,
                "seed": 7,
            },
            # FedGen's regulariser diverges at FedAvg's 0.05 here (non-finite losses by round 2); the
            # paper's 0.01 keeps it stable.
            "training": {"local_steps": 10, "batch_size": 32, "learning_rate": 0.05 if strategy != "fedgen" else 0.01},
            "data": {"test_data_dir": str(mnist), "evaluate_every": evaluate_every},
            "bandwidth": {"policy": "fixed"},
            "auth": {"enrollment_tokens": [TOKEN], "operator_token": OPERATOR},
            "robust": robust,
        }
    )


def model_attack_run(
    console: Console,
    mnist: Path,
    shards: list[Path],
    work: Path,
    strategy: str,
    attack: str,
    attackers: int,
    defence: str,
    rounds: int,
    stall_s: float,
) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    config = _config(work, mnist, strategy, rounds, attackers, DEFENCES[defence])
    started = time.monotonic()
    with LocalFederation(config, shards, work) as fed:
        fed.start_coordinator(timeout_s=180)
        hostile = [Attacker(fed.address, f"attacker-{k}", ATTACKS[attack]) for k in range(attackers)]
        for a in hostile:
            a.start()
        fed.start_clients()
        # A poisoned model can stall the federation for good (every honest update it leads to is
        # non-finite and refused, so no round commits again): that is a result, not a hang.
        codes = fed.wait_clients(timeout_s=stall_s + 30 * rounds)
        for a in hostile:
            a.stop.set()
    wall = time.monotonic() - started
    path = work / "state" / "ledger.jsonl"
    rows = sorted(read_jsonl(path), key=lambda r: r["round"]) if path.exists() else []
    stalled = len(rows) < rounds
    if not rows or (not stalled and codes != [0] * HONEST):
        raise BenchmarkError(f"{strategy}/{attack}x{attackers}/{defence}: clients {codes}, {len(rows)} rounds; {work}")
    accuracies = [r["test_accuracy"] for r in rows]
    extras = [r["extras"] for r in rows]
    result = {
        "section": "model",
        "strategy": strategy,
        "attack": attack if attackers else "none",
        "attackers": attackers,
        "defence": defence,
        "rounds": rounds,
        "rounds_committed": len(rows),
        "stalled": stalled,
        "final_accuracy": accuracies[-1],
        "best_accuracy": max(a for a in accuracies if a == a),
        "excluded_updates": int(sum(e.get("robust_excluded_updates", 0) for e in extras)),
        "clipped_updates": int(sum(e.get("robust_clipped_updates", 0) for e in extras)),
        "rounds_model_kept": sum(any(k.startswith("global_model_kept_") for k in e) for e in extras),
        "aggregate_seconds_per_round": statistics.fmean(r["aggregate_seconds"] for r in rows),
        "round_seconds_median": statistics.median(r["round_seconds"] for r in rows),
        "wall_seconds": wall,
        "attacker_uploads": sum(a.uploads for a in hostile),
    }
    console.print(
        f"  {strategy:6} {result['attack']:5} x{attackers} {defence:12} final {100 * result['final_accuracy']:6.2f}% "
        f"excluded {result['excluded_updates']:3} clipped {result['clipped_updates']:3} "
        f"kept {result['rounds_model_kept']} rounds {len(rows)}/{rounds}{' STALLED' if stalled else ''} ({wall:.0f} s)"
    )
    return result


def section_model(console: Console, args: argparse.Namespace, mnist: Path) -> list[dict[str, Any]]:
    console.print("[bold]1. Attacks on the model, per defence[/bold]")
    train = load_idx_dataset(mnist, "train")
    shards, _ = write_shards(train, args.out / "shards", HONEST, alpha=1.0, seed=0, samples_per_class=60)
    out: list[dict[str, Any]] = []
    for strategy in args.strategies:
        defences = args.defences if strategy == "fedavg" else [d for d in args.defences if d in args.fedgen_defences]
        for defence in defences:
            attacks = args.attacks if strategy == "fedavg" else args.fedgen_attacks
            plan = [("none", 0)] + [(a, n) for a in attacks for n in args.attackers if n > 0]
            for attack, n in plan:
                work = args.out / "model" / f"{strategy}-{attack}-{n}-{defence}"
                save_partial(args, out)  # a run cut short keeps what it measured
                out.append(
                    model_attack_run(
                        console,
                        mnist,
                        shards,
                        work,
                        strategy,
                        attack if n else "scale",
                        n,
                        defence,
                        args.rounds,
                        args.stall_s,
                    )
                )
    return out


def save_partial(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    write_results("robustness.partial", command_line(SCRIPT, args.argv), rows, {"partial": True}, results_dir=args.out)


# ------------------------------------------------------------------------------ resources
def _rounds_and_rss(
    fed: LocalFederation, seconds: float, attack: Callable[[threading.Event], None] | None
) -> dict[str, float]:
    assert fed.coordinator_proc is not None
    process = psutil.Process(fed.coordinator_proc.pid)
    stop = threading.Event()
    worker = threading.Thread(target=attack, args=(stop,), daemon=True) if attack else None
    with fed.channel() as channel:
        control = fed.control(channel)

        def current() -> int:
            for _ in range(100):  # after a flood of wrong tokens this address is locked out for a moment
                try:
                    status = control.GetStatus(
                        control_pb2.GetStatusRequest(), timeout=30, metadata=bearer_metadata(OPERATOR)
                    )
                    return int(status.current_round)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    time.sleep(0.5)
            raise BenchmarkError("the operator was locked out for 50 s")

        first, peak = current(), process.memory_info().rss
        if worker:
            worker.start()
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.2)
        stop.set()
        if worker:
            worker.join(30)
        last = current()
    return {"rounds_committed": last - first, "coordinator_rss_peak_mb": peak / 2**20, "alive": process.is_running()}


def _oversized_joins(address: str) -> Callable[[threading.Event], None]:
    def attack(stop: threading.Event) -> None:
        with grpc.insecure_channel(address, channel_options()) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            profile = fleet_pb2.DeviceProfile(platform="x" * 1_500_000)
            for k in range(20):
                if stop.is_set():
                    return
                request = fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id=f"big-{k}", profile=profile)
                with contextlib.suppress(grpc.RpcError):
                    stub.Join(request, timeout=30)

    return attack


def _fake_joins(address: str) -> Callable[[threading.Event], None]:
    def attack(stop: threading.Event) -> None:
        with grpc.insecure_channel(address, channel_options()) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            for k in range(2000):
                if stop.is_set():
                    return
                with contextlib.suppress(grpc.RpcError):
                    stub.Join(
                        fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id=f"fake-{k}"), timeout=30
                    )

    return attack


def _wrong_tokens(address: str) -> Callable[[threading.Event], None]:
    def attack(stop: threading.Event) -> None:
        with grpc.insecure_channel(address, channel_options()) as channel:
            stub = fleet_pb2_grpc.FleetStub(channel)
            k = 0
            while not stop.is_set():
                with contextlib.suppress(grpc.RpcError):
                    stub.Join(fleet_pb2.JoinRequest(enrollment_token=f"guess-{k:010d}"), timeout=30)
                k += 1

    return attack


def _idle_sockets(port: int) -> Callable[[threading.Event], None]:
    def attack(stop: threading.Event) -> None:
        held: list[socket.socket] = []
        while not stop.is_set():  # keep 1,124 raw connections open, reopening what the server closes
            for s in list(held):
                s.setblocking(False)
                try:
                    if s.recv(65536) == b"":
                        held.remove(s)
                        s.close()
                except BlockingIOError:
                    pass
                except OSError:
                    held.remove(s)
            while len(held) < 1124 and not stop.is_set():
                try:
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
                except OSError:
                    break
            stop.wait(0.5)
        for s in held:
            s.close()

    return attack


def section_resources(console: Console, args: argparse.Namespace, mnist: Path) -> list[dict[str, Any]]:
    console.print("[bold]2. Attacks on the coordinator's resources[/bold]")
    work = args.out / "resources"
    shutil.rmtree(work, ignore_errors=True)
    train = load_idx_dataset(mnist, "train")
    shards, _ = write_shards(train, work / "shards", HONEST, alpha=1.0, seed=0, samples_per_class=30)
    config = _config(work, mnist, "fedavg", 100_000, 0, {}, evaluate_every=100_000)
    out = []
    with LocalFederation(config, shards, work) as fed:
        fed.start_coordinator(timeout_s=180)
        fed.start_clients()
        time.sleep(30)  # every client joined and trained once
        attacks: list[tuple[str, Callable[[threading.Event], None] | None]] = [
            ("none", None),
            ("20 Joins of 1.5 MB", _oversized_joins(fed.address)),
            ("2,000 ids that only join", _fake_joins(fed.address)),
            ("wrong enrollment tokens, flat out", _wrong_tokens(fed.address)),
            ("1,124 idle TCP connections", _idle_sockets(fed.port)),
        ]
        for name, attack in attacks:
            measured = _rounds_and_rss(fed, args.resource_seconds, attack)
            row = {"section": "resources", "attack": name, "seconds": args.resource_seconds, **measured}
            out.append(row)
            console.print(
                f"  {name:36} rounds {row['rounds_committed']:3}  coordinator RSS peak "
                f"{row['coordinator_rss_peak_mb']:.0f} MB  alive {row['alive']}"
            )
            time.sleep(3)  # lockouts and caps drain before the next attack
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--strategies", type=csv, default=["fedavg", "fedgen"])
    p.add_argument("--attacks", type=csv, default=list(ATTACKS), help=f"of {sorted(ATTACKS)}")
    p.add_argument("--attackers", type=lambda s: [int(x) for x in s.split(",")], default=[3])
    p.add_argument("--defences", type=csv, default=list(DEFENCES))
    p.add_argument("--fedgen-defences", type=csv, default=["mean", "median"], help="the defences FedGen runs with")
    p.add_argument("--fedgen-attacks", type=csv, default=["scale"], help="the attacks FedGen runs against")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--stall-s", type=float, default=120.0, help="a run that commits nothing more this long: stalled")
    p.add_argument("--resource-seconds", type=float, default=20.0)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-resources", action="store_true")
    p.add_argument("--out", type=Path, default=Path("/tmp/fedgen-robustness"))
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.argv = argv
    unknown = sorted(set(args.attacks) - ATTACKS.keys()) + sorted(set(args.defences) - DEFENCES.keys())
    if unknown:
        p.error(f"unknown attack or defence: {unknown}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    mnist = shared_data_dir() / "mnist"
    try:
        model = [] if args.skip_model else section_model(console, args, mnist)
        resources = [] if args.skip_resources else section_resources(console, args, mnist)
    except BenchmarkError as err:
        console.print(f"[red]robustness: {err}[/red]")
        return 1
    if model:
        table = Table(title="Model attacks: accuracy of the global model (%) and what each defence did")
        for col in (
            "strategy",
            "attack",
            "n",
            "defence",
            "final",
            "best",
            "excluded",
            "clipped",
            "kept",
            "rounds",
            "agg ms",
        ):
            table.add_column(col)
        for r in model:
            table.add_row(
                r["strategy"],
                r["attack"],
                str(r["attackers"]),
                r["defence"],
                f"{100 * r['final_accuracy']:.2f}",
                f"{100 * r['best_accuracy']:.2f}",
                str(r["excluded_updates"]),
                str(r["clipped_updates"]),
                str(r["rounds_model_kept"]),
                f"{r['rounds_committed']}/{r['rounds']}{' stalled' if r['stalled'] else ''}",
                f"{1000 * r['aggregate_seconds_per_round']:.0f}",
            )
        console.print(table)
    json_path = write_results(
        "robustness",
        command_line(SCRIPT, argv),
        [*model, *resources],
        {"honest_clients": HONEST, "defences": DEFENCES},
        results_dir=args.results_dir,
    )
    console.print(f"results: {json_path}, {json_path.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
