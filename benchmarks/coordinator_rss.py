"""The coordinator's resident memory over many rounds: does anything grow with the round count?

A real coordinator process and edge-client processes on loopback (`LocalFederation`), FedAvg on
MNIST with the 10,000-image test set evaluated every round (default: 200 rounds, 4 clients, 5
local steps). After each commit this samples the coordinator's RSS (psutil) and reports it at
rounds 1, 10, 50, 100 and the last, and the growth after round 10: the largest RSS from round 10
on against the RSS at round 10 (the issue's bar: within 10%).

    python benchmarks/coordinator_rss.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from common import RESULTS_DIR, BenchmarkError, command_line, shared_data_dir, write_results
from rich.console import Console
from rich.table import Table

from fedgen.coordinator.config import CoordinatorConfig, load_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.coordinator.plots import save_figure
from fedgen.core.data import load_idx_dataset
from fedgen.v1 import control_pb2

NAME = "coordinator_rss"
SCRIPT = "benchmarks/coordinator_rss.py"
MIB = 1024 * 1024
#: The round the growth is measured from (start-up's allocations have settled by then).
SETTLED_ROUND = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedgen"))
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--samples-per-class", type=int, default=30)
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX folder (default ../shared/data/mnist)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fedgen-coordinator-rss")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def _config(args: argparse.Namespace, work: Path, data_dir: Path) -> CoordinatorConfig:
    return load_config(
        None,
        {
            "state_dir": str(work / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": args.strategy,
                "rounds": args.rounds,
                "clients_per_round": args.clients,
                "min_clients": args.clients,
                "min_completed": args.clients,
                "round_timeout_s": 600,
                "seed": 0,
            },
            "training": {"local_steps": args.local_steps, "batch_size": 32},
            "fedgen": {"device": "cpu"},
            "data": {"test_data_dir": str(data_dir), "evaluate_every": 1},
        },
    )


def measure(config: CoordinatorConfig, shards: list[Path], args: argparse.Namespace, work: Path) -> list[float]:
    """The coordinator's RSS (MiB) after each round's commit, round 0 first."""
    rss: dict[int, float] = {}
    with LocalFederation(config, shards, work) as fed:
        fed.start_coordinator()
        assert fed.coordinator_proc is not None
        coordinator = psutil.Process(fed.coordinator_proc.pid)
        fed.start_clients()
        finished = False
        for event in fed.events(timeout_s=args.rounds * 60 + 300):
            if event.kind == control_pb2.RoundEvent.KIND_ROUND_COMMITTED:
                rss[event.round] = coordinator.memory_info().rss / MIB
            finished = event.kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
        fed.wait_clients(timeout_s=120)
    if not finished or len(rss) != args.rounds:
        raise BenchmarkError(f"{len(rss)} of {args.rounds} rounds seen committed; see {work}/coordinator.log")
    return [rss[r] for r in range(args.rounds)]


def summarize(rss: list[float]) -> dict[str, Any]:
    settled = rss[min(SETTLED_ROUND, len(rss)) - 1]
    peak_after = max(rss[SETTLED_ROUND - 1 :]) if len(rss) >= SETTLED_ROUND else settled
    marks = {f"rss_round_{r}_mib": round(rss[r - 1], 1) for r in (1, SETTLED_ROUND, 50, 100) if r <= len(rss)}
    return {
        **marks,
        "rss_last_round_mib": round(rss[-1], 1),
        "peak_after_settled_mib": round(peak_after, 1),
        "growth_after_settled": round(peak_after / settled - 1, 4),
        "rounds": len(rss),
        "rss_by_round_mib": [round(v, 1) for v in rss],
    }


def plot(rss: list[float], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt  # fedgen.coordinator.plots selected the Agg backend

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(range(1, len(rss) + 1), rss)
    ax.axhline(rss[min(SETTLED_ROUND, len(rss)) - 1] * 1.1, color="grey", ls="--", lw=0.8, label="round 10 + 10%")
    ax.set_xlabel("round")
    ax.set_ylabel("coordinator RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=110)
    try:
        if args.rounds < SETTLED_ROUND:
            raise BenchmarkError(f"--rounds must be at least {SETTLED_ROUND}")
        data_dir = args.data_dir or shared_data_dir() / "mnist"
        if args.out.exists():  # a coordinator resumes the federation it finds in its state: start afresh
            shutil.rmtree(args.out)
        train = load_idx_dataset(data_dir, "train")
        shards, _ = write_shards(
            train, args.out / "shards", args.clients, alpha=1.0, seed=0, samples_per_class=args.samples_per_class
        )
        console.print(f"{args.strategy}: {args.rounds} rounds of {args.clients} client processes ...")
        started = time.monotonic()
        rss = measure(_config(args, args.out / "federation", data_dir), shards, args, args.out / "federation")
    except BenchmarkError as err:
        console.print(f"[red]coordinator_rss: {err}[/red]")
        return 1
    row = {"strategy": args.strategy, **summarize(rss), "seconds": round(time.monotonic() - started, 1)}
    table = Table(title=f"The coordinator's RSS over {args.rounds} rounds (MiB; 2 shared cores)")
    shown = [k for k in row if k.startswith("rss_round_")] + ["rss_last_round_mib", "growth_after_settled"]
    for col in ("strategy", *shown):
        table.add_column(col.replace("_mib", "").replace("_", " "))
    table.add_row(args.strategy, *(f"{row[k]:.1f}" if k.endswith("mib") else f"{100 * row[k]:+.1f}%" for k in shown))
    console.print(table)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "results_dir", "data_dir")}
    json_path = write_results(NAME, command_line(SCRIPT, argv), [row], {"settings": settings}, args.results_dir)
    png = plot(rss, args.results_dir / f"{NAME}.png", f"Coordinator RSS, {args.strategy}, {args.clients} clients")
    console.print(f"results: {json_path}, {json_path.with_suffix('.csv')}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
