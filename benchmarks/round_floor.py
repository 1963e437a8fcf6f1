"""The round against its compute floor: what the federation adds to the work a round must do.

Workload (issue 13): FedGen's MNIST CNN, 10 clients all sampled every round, 20 SGD steps of
batch 32, the 10,000-image MNIST test set evaluated every round, fp32 everywhere; FedAvg and
FedGen.

The floor runs in this one process, with no gRPC, no disk and no scheduling, the compute a round
of the federation does: each client's evaluation of the global model on its local test split and
its local training, with one torch thread as the clients have (under FedGen with the round's
generator in onnxruntime, loaded from its ONNX file as a device does), then the coordinator's
aggregation (under FedGen the generator's training and its ONNX export) and the evaluation of the
new global model with torch's default threads. Its CPU-seconds are what it used; its wall time
is the clients' serial time divided by the cores (their work is independent: the best any
scheduler could do) plus the coordinator's step, which waits for the last client. The federation is a real coordinator
process and 10 edge-client processes on loopback (`LocalFederation`, one torch thread per
client). Per round: wall seconds (the floor's own, the federation's from the ledger's commit
times) and CPU-seconds (user + system of this process, or of all the federation's processes,
over the measured rounds). The first `--warm-up` rounds are left out of both.

    python benchmarks/round_floor.py
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from common import RESULTS_DIR, BenchmarkError, command_line, shared_data_dir, write_results
from rich.console import Console
from rich.table import Table

from fedgen.coordinator.config import CoordinatorConfig, load_config
from fedgen.coordinator.ledger import read_jsonl
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.coordinator.plots import save_figure
from fedgen.coordinator.strategy import ClientResult, make_strategy
from fedgen.coordinator.task_setup import load_task_contract
from fedgen.core.data import load_idx_dataset
from fedgen.edge.generator_runtime import OnnxGenerator
from fedgen.edge.runner import read_local_data
from fedgen.edge.trainer import LocalTrainer, TrainPlan, choose_onednn, warm_up
from fedgen.v1 import control_pb2, control_pb2_grpc

NAME = "round_floor"
SCRIPT = "benchmarks/round_floor.py"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", default="fedavg,fedgen", help="comma-separated: fedavg, fedgen")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warm-up", type=int, default=2, help="rounds left out of the figures")
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples-per-class", type=int, default=60)
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX folder (default ../shared/data/mnist)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fedgen-round-floor")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.rounds <= args.warm_up:
        p.error("--rounds must exceed --warm-up")
    return args


def _config(args: argparse.Namespace, strategy: str, work: Path, data_dir: Path) -> CoordinatorConfig:
    return load_config(
        None,
        {
            "state_dir": str(work / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": strategy,
                "rounds": args.rounds,
                "clients_per_round": args.clients,
                "min_clients": args.clients,
                "min_completed": args.clients,
                "round_timeout_s": 600,
                "seed": 0,
            },
            "training": {"local_steps": args.local_steps, "batch_size": args.batch_size},
            "fedgen": {"device": "cpu"},
            "bandwidth": {"policy": "fixed"},  # fp32 model, generator and updates
            "data": {"test_data_dir": str(data_dir), "evaluate_every": 1},
        },
    )


def _plan(strategy: Any, round_: int, label_space: tuple[int, ...]) -> TrainPlan:
    """The plan an edge client builds from the round's task (`fedgen.edge.runner`)."""
    cfg = strategy.configure_round(round_)
    params = strategy.round_params(round_)
    return TrainPlan(
        cfg.local_steps,
        cfg.batch_size,
        cfg.learning_rate,
        strategy.name,
        proximal_mu=params.get("proximal_mu", 0.0),
        generative_alpha=params.get("generative_alpha", 0.0),
        generative_beta=params.get("generative_beta", 0.0),
        gen_batch_size=int(params.get("gen_batch_size", 32)),
        label_space=label_space,
    )


def measure_floor(
    config: CoordinatorConfig, shards: list[Path], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """The same rounds' compute in this process: seconds and CPU-seconds per round."""
    task, model = load_task_contract(config)
    server_onednn = bool(torch.backends.mkldnn.enabled)  # the coordinator leaves torch's default
    choose_onednn(task)  # what each edge client picks for its own training (`--onednn auto`)
    client_onednn = bool(torch.backends.mkldnn.enabled)
    strategy = make_strategy(config, model)
    clients = []
    for k, shard in enumerate(shards):
        train, test = read_local_data(task, shard)
        local_test = (test.samples, test.labels) if test is not None and len(test) else None
        clients.append((LocalTrainer(task, train.samples, train.labels, config.federation.seed + k), local_test))
    warm_up(task)
    state = model.initial_state(config.federation.seed)
    generator_file = work / "generator.onnx"
    cores = psutil.cpu_count() or 1
    server_threads = torch.get_num_threads()  # the coordinator's (torch's default)
    walls, cpus, accuracy = [], [], float("nan")
    for round_ in range(args.rounds):
        client_wall = client_cpu = 0.0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        artifacts = strategy.round_artifacts(round_)
        if artifacts:
            generator_file.write_bytes(artifacts[0].data)
        plan = _plan(strategy, round_, tuple(strategy.label_space(model.n_classes)))
        results = []
        torch.set_num_threads(1)  # as each edge client trains (`LocalFederation`'s client_threads)
        torch.backends.mkldnn.enabled = client_onednn  # type: ignore[assignment]  # a descriptor in the stubs
        for k, (trainer, local_test) in enumerate(clients):
            c_wall, c_cpu = time.perf_counter(), time.process_time()
            generator = OnnxGenerator(generator_file, threads=1) if artifacts else None
            if local_test is not None:
                trainer.evaluate(state, *local_test)
            done = trainer.train(state, plan, generator)
            client_wall += time.perf_counter() - c_wall
            client_cpu += time.process_time() - c_cpu
            results.append(
                ClientResult(f"client-{k:02d}", done.state, done.num_examples, done.label_counts, done.metrics)
            )
        torch.set_num_threads(server_threads)
        torch.backends.mkldnn.enabled = server_onednn  # type: ignore[assignment]
        state = strategy.aggregate_round(round_, results, state).state
        accuracy = model.evaluate(state).accuracy
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        # The clients' work is independent, so on `cores` cores it takes at best 1/cores of its
        # serial time; the coordinator's step cannot start before the last client is done.
        walls.append(client_wall / min(cores, len(clients)) + (wall - client_wall))
        cpus.append(cpu)
    measured = slice(args.warm_up, None)
    return {
        "seconds_per_round": statistics.median(walls[measured]),
        "cpu_seconds_per_round": statistics.fmean(cpus[measured]),
        "seconds_by_round": [round(w, 3) for w in walls],
        "final_accuracy": accuracy,
        "cores": cores,
    }


def _cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def measure_federation(
    config: CoordinatorConfig, shards: list[Path], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """The same rounds through a real coordinator and real edge-client processes."""
    cpu_at: dict[int, float] = {}
    with LocalFederation(config, shards, work) as fed:
        fed.start_coordinator()
        with fed.channel() as channel:  # the first round waits until every client has joined
            control = control_pb2_grpc.ControlStub(channel)
            control.Pause(control_pb2.PauseRequest(), timeout=10)
            fed.start_clients()
            until = time.monotonic() + 300
            while control.GetStatus(control_pb2.GetStatusRequest(), timeout=10).connected_clients < args.clients:
                if time.monotonic() > until:
                    raise BenchmarkError(f"the clients did not join; see {work}/*.log")
                time.sleep(0.2)
            assert fed.coordinator_proc is not None
            procs = [psutil.Process(p.pid) for p in (fed.coordinator_proc, *fed.client_procs)]
            control.Resume(control_pb2.ResumeRequest(), timeout=10)
        finished = False
        for event in fed.events(timeout_s=args.rounds * 600 + 300):
            if event.kind == control_pb2.RoundEvent.KIND_ROUND_COMMITTED:
                cpu_at[event.round] = _cpu_seconds(procs)
            finished = event.kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
        fed.wait_clients(timeout_s=120)
    if not finished:
        raise BenchmarkError(f"the federation did not finish; see {work}/coordinator.log")
    rows = read_jsonl(work / "state" / "ledger.jsonl")
    committed = [row["committed_unix_ms"] / 1000 for row in rows]
    walls = [b - a for a, b in itertools.pairwise(committed)]  # round r: commit r-1 to commit r
    first, last = args.warm_up - 1, args.rounds - 1
    if first not in cpu_at or last not in cpu_at:
        raise BenchmarkError(f"missed commit events (have rounds {sorted(cpu_at)}); see {work}/coordinator.log")
    return {
        "seconds_per_round": statistics.median(walls[first:]),
        "cpu_seconds_per_round": (cpu_at[last] - cpu_at[first]) / (last - first),
        "seconds_by_round": [round(w, 3) for w in walls],
        "final_accuracy": rows[-1]["test_accuracy"],
        "completed_per_round": [row["completed"] for row in rows],
    }


def print_table(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="A round against its compute floor (2 shared cores; medians after warm-up)")
    for col in ("strategy", "run", "s/round", "CPU-s/round", "x floor (wall)", "x floor (CPU)", "accuracy"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["strategy"],
            r["run"],
            f"{r['seconds_per_round']:.3f}",
            f"{r['cpu_seconds_per_round']:.3f}",
            f"{r['wall_ratio']:.2f}",
            f"{r['cpu_ratio']:.2f}",
            f"{100 * r['final_accuracy']:.2f}",
        )
    console.print(table)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt  # fedgen.coordinator.plots selected the Agg backend

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    strategies = sorted({r["strategy"] for r in rows})
    for ax, key, label in (
        (axes[0], "seconds_per_round", "seconds per round"),
        (axes[1], "cpu_seconds_per_round", "CPU-seconds per round"),
    ):
        for i, run in enumerate(("floor", "federation")):
            values = [next(r[key] for r in rows if r["strategy"] == s and r["run"] == run) for s in strategies]
            ax.bar([x + 0.4 * i - 0.2 for x in range(len(strategies))], values, width=0.4, label=run)
        ax.set_xticks(list(range(len(strategies))), strategies)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle("A round against its compute floor (10 clients, MNIST CNN)")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=110)
    try:
        data_dir = args.data_dir or shared_data_dir() / "mnist"
        if args.out.exists():  # a coordinator resumes the federation it finds in its state: start afresh
            shutil.rmtree(args.out)
        train = load_idx_dataset(data_dir, "train")
        shards, _ = write_shards(
            train, args.out / "shards", args.clients, alpha=1.0, seed=0, samples_per_class=args.samples_per_class
        )
        rows: list[dict[str, Any]] = []
        for strategy in args.strategies.split(","):
            work = args.out / strategy
            config = _config(args, strategy, work / "federation", data_dir)
            work.mkdir(parents=True, exist_ok=True)
            console.print(f"{strategy}: the floor, in this process ...")
            floor = measure_floor(config, shards, args, work)
            console.print(f"{strategy}: the federation, {args.clients} client processes ...")
            federation = measure_federation(config, shards, args, work / "federation")
            for run, measured in (("floor", floor), ("federation", federation)):
                rows.append(
                    {
                        "strategy": strategy,
                        "run": run,
                        **measured,
                        "wall_ratio": measured["seconds_per_round"] / floor["seconds_per_round"],
                        "cpu_ratio": measured["cpu_seconds_per_round"] / floor["cpu_seconds_per_round"],
                    }
                )
    except BenchmarkError as err:
        console.print(f"[red]round_floor: {err}[/red]")
        return 1
    print_table(console, rows)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "results_dir", "data_dir")}
    json_path = write_results(NAME, command_line(SCRIPT, argv), rows, {"settings": settings}, args.results_dir)
    png = plot(rows, args.results_dir / f"{NAME}.png")
    console.print(f"results: {json_path}, {json_path.with_suffix('.csv')}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
