"""What a round of FedGen costs an edge device, at several memory budgets, measured on the device.

For each budget, a short FedGen federation over loopback gRPC: one coordinator process, the
measured edge client (client-00) started with `--memory-budget-mb BUDGET`, and two helper clients
without a budget so that rounds happen even when the measured one declines. The measured client
reports, per round, its own peak resident memory (VmHWM, reset at the start of each round), its
CPU seconds and wall seconds; the coordinator's ledger keeps them with the bytes each round moved.
Import time and the resident size right after `import fedgen.edge.runner` are measured in fresh
interpreters. Writes benchmarks/results/edge_footprint.{json,csv,png}.

    python benchmarks/edge_footprint.py                       # budgets 256, 384, 512, 1024 MB
    python benchmarks/edge_footprint.py --budgets 384 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO_ROOT, RESULTS_DIR, BenchmarkError, command_line, shared_data_dir, write_results
from rich.console import Console
from rich.table import Table

from fedgen.coordinator.config import load_config
from fedgen.coordinator.ledger import read_jsonl
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.coordinator.plots import save_figure
from fedgen.core.data import DataError, load_idx_dataset
from fedgen.v1 import control_pb2, control_pb2_grpc

NAME = "edge_footprint"
SCRIPT = "benchmarks/edge_footprint.py"
MEASURED = "client-00"

IMPORT_PROBE = """
import json, time
t = time.perf_counter()
import fedgen.edge.runner, fedgen.edge.generator_runtime
took = time.perf_counter() - t
from fedgen.edge.budget import rss_mib, peak_rss_mib
print(json.dumps({"import_seconds": took, "rss_after_import_mb": rss_mib(), "peak_during_import_mb": peak_rss_mib()}))
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", default="256,384,512,1024", help="memory budgets in MB, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--samples-per-class", type=int, default=300)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX files (default: shared/data/mnist)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / NAME)
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def measure_import(repeats: int = 3) -> dict[str, float]:
    """Median import time and the process's resident size right after it, in fresh interpreters."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=300,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        if out.returncode != 0:
            raise BenchmarkError(f"import probe failed: {out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def run_budget(args: argparse.Namespace, budget: int, shards: list[Path], data_dir: Path) -> dict[str, Any]:
    work = args.out / f"budget-{budget}"
    if work.exists():  # a coordinator resumes the federation it finds in its state: start afresh
        shutil.rmtree(work)
    config = load_config(
        None,
        {
            "state_dir": str(work / "state"),
            "server": {"address": "127.0.0.1:0"},
            # min_clients 2: the rounds go on with the two helpers when the measured client declines.
            "federation": {
                "strategy": "fedgen",
                "rounds": args.rounds,
                "clients_per_round": 3,
                "min_clients": 2,
                "min_completed": 2,
                "round_timeout_s": 300,
                "seed": 0,
            },
            "training": {"local_steps": args.local_steps, "batch_size": args.batch_size},
            "fedgen": {"device": "cpu"},
            "data": {"test_data_dir": str(data_dir)},
        },
    )
    started = time.monotonic()
    with LocalFederation(
        config, shards, work, per_client_args={0: ["--memory-budget-mb", str(budget)]}, client_log_level="INFO"
    ) as fed:
        fed.start_coordinator()
        with fed.channel() as channel:  # round 0 waits until all three have joined
            control = control_pb2_grpc.ControlStub(channel)
            control.Pause(control_pb2.PauseRequest(), timeout=10)
            fed.start_clients()
            until = time.monotonic() + 300
            while control.GetStatus(control_pb2.GetStatusRequest(), timeout=10).connected_clients < 3:
                if time.monotonic() > until:
                    raise BenchmarkError(f"budget {budget}: clients did not join; see {work}/*.log")
                time.sleep(0.2)
            control.Resume(control_pb2.ResumeRequest(), timeout=10)
        events = list(fed.events(timeout_s=args.rounds * 400 + 300))
        exit_codes = fed.wait_clients(timeout_s=120)
    wall = time.monotonic() - started
    if not events or events[-1].kind != events[-1].KIND_FEDERATION_FINISHED:
        raise BenchmarkError(f"budget {budget}: the federation did not finish; see {work}/coordinator.log")
    ledger = read_jsonl(work / "state" / "ledger.jsonl")
    mine = [c for row in ledger for c in row["clients"] if c["client_id"] == MEASURED]
    done = [c for c in mine if c["outcome"] == "completed"]
    declined = [c for c in mine if c["outcome"] == "declined"]
    skipped = [s for row in ledger for s in row.get("skipped", []) if s["client_id"] == MEASURED]
    peaks = [c["metrics"]["peak_rss_mb"] for c in done if "peak_rss_mb" in c["metrics"]]
    budgets = [c["metrics"]["memory_budget_mb"] for c in done if "memory_budget_mb" in c["metrics"]]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values) if values else math.nan

    return {
        "budget_mb": budget,
        "round_completed": bool(done),
        "rounds_completed": len(done),
        "rounds_declined": len(declined),
        "rounds_skipped": len(skipped),
        "decline_reason": declined[0]["reason"] if declined else "",
        "peak_rss_mb": max(peaks) if peaks else math.nan,
        "estimated_peak_mb": max((c["metrics"].get("estimated_peak_mb", math.nan) for c in done), default=math.nan),
        "micro_batch": min((c["metrics"].get("micro_batch", math.nan) for c in done), default=math.nan),
        "over_budget_rounds": sum(p > b for p, b in zip(peaks, budgets, strict=False)),
        "seconds_per_round": mean([c["train_seconds"] for c in done]),
        "cpu_seconds_per_round": mean([c["metrics"]["cpu_seconds"] for c in done if "cpu_seconds" in c["metrics"]]),
        "bytes_per_round": mean([c["bytes_down"] + c["bytes_up"] for c in done]),
        "bytes_down_per_round": mean([c["bytes_down"] for c in done]),
        "bytes_up_per_round": mean([c["bytes_up"] for c in done]),
        "accuracy": ledger[-1]["test_accuracy"] if ledger else math.nan,
        "federation_rounds": len(ledger),
        "client_exit_codes": exit_codes,
        "wall_seconds": round(wall, 1),
    }


def print_table(console: Console, rows: list[dict[str, Any]], imp: dict[str, float]) -> None:
    table = Table(
        title=f"FedGen on MNIST, one edge client at each memory budget (import: "
        f"{imp['import_seconds']:.2f} s, {imp['rss_after_import_mb']:.0f} MB resident after it)",
        title_justify="left",
    )
    for col in (
        "budget MB",
        "rounds done / declined",
        "peak RSS MB",
        "estimated MB",
        "micro-batch",
        "s / round",
        "CPU s / round",
        "KB / round",
        "global acc",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        f = lambda v, fmt: "—" if isinstance(v, float) and math.isnan(v) else format(v, fmt)  # noqa: E731
        table.add_row(
            str(r["budget_mb"]),
            f"{r['rounds_completed']} / {r['rounds_declined']}",
            f(r["peak_rss_mb"], ".0f"),
            f(r["estimated_peak_mb"], ".0f"),
            f(r["micro_batch"], ".0f"),
            f(r["seconds_per_round"], ".2f"),
            f(r["cpu_seconds_per_round"], ".2f"),
            f(r["bytes_per_round"] / 1e3, ".0f"),
            f(100 * r["accuracy"], ".2f"),
        )
    console.print(table)
    for r in rows:
        if r["decline_reason"]:
            console.print(
                f"budget {r['budget_mb']} MB: declined ({r['decline_reason']}); then skipped in "
                f"{r['rounds_skipped']} round(s)"
            )


def plot(rows: list[dict[str, Any]], imp: dict[str, float], path: Path) -> Path:
    import matplotlib.pyplot as plt  # fedgen.coordinator.plots selected the Agg backend

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["budget_mb"] for r in rows], width=0.4, label="budget", color="tab:gray")
    ax.bar(
        [x + 0.2 for x in xs],
        [0 if math.isnan(r["peak_rss_mb"]) else r["peak_rss_mb"] for r in rows],
        width=0.4,
        label="measured peak RSS of a round",
        color="tab:green",
    )
    ax.axhline(
        imp["rss_after_import_mb"],
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"resident after import ({imp['rss_after_import_mb']:.0f} MB)",
    )
    for x, r in zip(xs, rows, strict=False):
        if not r["round_completed"]:
            ax.text(x + 0.2, 10, "declined", rotation=90, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [f"{r['budget_mb']} MB" for r in rows])
    ax.set_ylabel("MB")
    ax.set_title("Edge client memory per FedGen round (MNIST)")
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        data_dir = args.data_dir or shared_data_dir() / "mnist"
        train = load_idx_dataset(data_dir, "train")
    except (ValueError, BenchmarkError, DataError) as err:
        console.print(f"[red]{NAME}: {err}[/red]")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    shards, _ = write_shards(
        train, args.out / "shards", 3, args.alpha, seed=0, samples_per_class=args.samples_per_class
    )
    imp = measure_import()
    console.print(f"import edge_client: {imp['import_seconds']:.2f} s, {imp['rss_after_import_mb']:.0f} MB resident")
    rows = []
    for budget in budgets:
        console.print(f"budget {budget} MB: {args.rounds} FedGen rounds ...")
        try:
            rows.append(run_budget(args, budget, shards, data_dir))
        except BenchmarkError as err:
            console.print(f"[red]{err}[/red]")
            return 1
    print_table(console, rows, imp)
    extra = {
        "import": imp,
        "setting": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "over_budget_rounds_total": sum(r["over_budget_rounds"] for r in rows),
    }
    json_path = write_results(NAME, command_line(SCRIPT, argv), rows, extra, results_dir=args.results_dir)
    png = plot(rows, imp, args.results_dir / f"{NAME}.png")
    console.print(f"results: {json_path}, {json_path.with_suffix('.csv')}, {png}")
    bad = [r["budget_mb"] for r in rows if r["over_budget_rounds"]]
    if bad:
        console.print(f"[red]a round exceeded its budget at {bad} MB[/red]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
