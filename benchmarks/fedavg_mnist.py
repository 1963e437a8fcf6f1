"""FedAvg on MNIST in FedGen's official setting, as a real federation over loopback gRPC.

One coordinator process and one edge-client process per client (LocalFederation): real
processes, real sockets, the same wire a deployment uses. The partition is FedGen's
(20 clients, Dirichlet alpha=0.1, 1,500 images per class = 15,000 training images); local
training is 20 SGD steps of batch 32 at lr 0.01 * 0.99**round; 10 of 20 clients per round.
The global model is evaluated by the coordinator on the full 10,000-image MNIST test set
after every round. Writes benchmarks/results/fedavg_mnist.{json,csv,png}.

    python benchmarks/fedavg_mnist.py               # the full setting, 100 rounds
    python benchmarks/fedavg_mnist.py --rounds 10   # a quick look
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc
import numpy as np
from common import REPO_ROOT, RESULTS_DIR, BenchmarkError, command_line, shared_data_dir, write_results
from rich.console import Console
from rich.table import Table

from fedgen.coordinator.config import ConfigError, CoordinatorConfig, load_config
from fedgen.coordinator.ledger import read_jsonl
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.coordinator.plots import save_figure
from fedgen.coordinator.wire import ledger_row_from_proto
from fedgen.core.data import DataError, load_idx_dataset
from fedgen.v1 import control_pb2

NAME = "fedavg_mnist"
SCRIPT = "benchmarks/fedavg_mnist.py"
EVENT = control_pb2.RoundEvent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--clients", type=int, default=20, help="edge-client processes (one per client)")
    p.add_argument("--per-round", type=int, default=10, help="clients sampled per round")
    p.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label skew (smaller = more non-IID)")
    p.add_argument(
        "--samples-per-class",
        type=int,
        default=1500,
        help="training images kept per class (FedGen: 1500 -> 15,000 images)",
    )
    p.add_argument("--local-steps", type=int, default=20, help="SGD steps (minibatches) per client per round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--lr-decay", type=float, default=0.99, help="lr = lr * lr_decay**round")
    p.add_argument("--seed", type=int, default=0, help="partition, cohort sampling and client seeds")
    p.add_argument(
        "--round-timeout", type=float, default=120.0, help="seconds before a round closes without stragglers"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST IDX files (default: <repo>/../shared/data/mnist)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="work dir for shards, coordinator state and logs (default: a new temp dir under runs/)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON, CSV and PNG go")
    args = p.parse_args(argv)
    if args.per_round > args.clients:
        p.error(f"--per-round ({args.per_round}) exceeds --clients ({args.clients})")
    if args.rounds < 1 or args.clients < 1 or args.per_round < 1:
        p.error("--rounds, --clients and --per-round must be >= 1")
    return args


def build_config(args: argparse.Namespace, data_dir: Path, state_dir: Path) -> CoordinatorConfig:
    return load_config(
        None,
        {
            "state_dir": str(state_dir),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": "fedavg",
                "rounds": args.rounds,
                "clients_per_round": args.per_round,
                # Wait for every client before round 0, so the first cohort is drawn from all of them.
                "min_clients": args.clients,
                "min_completed": max(1, args.per_round // 2),
                "round_timeout_s": args.round_timeout,
                "seed": args.seed,
            },
            "training": {
                "local_steps": args.local_steps,
                "batch_size": args.batch_size,
                "learning_rate": args.lr,
                "lr_decay": args.lr_decay,
            },
            "data": {"test_data_dir": str(data_dir), "evaluate_every": 1},
        },
    )


def run_federation(
    console: Console, fed: LocalFederation, rounds: int, timeout_s: float
) -> tuple[list[dict[str, Any]], int]:
    """Streams Control events until FEDERATION_FINISHED; returns committed ledger rows and failed-round count."""
    rows: list[dict[str, Any]] = []
    failed = 0
    t0 = time.monotonic()
    for event in fed.events(timeout_s=timeout_s):
        if event.kind == EVENT.KIND_ROUND_COMMITTED:
            row = ledger_row_from_proto(event.ledger_row).to_dict()
            rows.append(row)
            if (row["round"] + 1) % 10 == 0 or row["round"] == 0 or row["round"] + 1 == rounds:
                acc = row["test_accuracy"]
                console.print(
                    f"round {row['round'] + 1:4d}/{rounds}: acc "
                    f"{'—' if math.isnan(acc) else f'{100 * acc:.2f}%'}, "
                    f"{row['completed']}/{row['cohort_size']} updates, {row['round_seconds']:.2f} s "
                    f"(elapsed {time.monotonic() - t0:.0f} s)"
                )
        elif event.kind == EVENT.KIND_UPDATE_REJECTED:
            console.print(
                f"[yellow]round {event.round + 1}: update from {event.client_id} rejected: {event.message}[/yellow]"
            )
        elif event.kind == EVENT.KIND_ROUND_FAILED:
            failed += 1
            console.print(f"[yellow]round {event.round + 1} failed: {event.message} (it will be retried)[/yellow]")
        elif event.kind == EVENT.KIND_FEDERATION_FINISHED:
            break
    return rows, failed


def merge_with_ledger_file(rows: list[dict[str, Any]], state_dir: Path) -> list[dict[str, Any]]:
    """Fills rounds the event stream missed (if it connected late) from the coordinator's ledger.jsonl."""
    path = state_dir / "ledger.jsonl"
    by_round = {r["round"]: r for r in rows}
    if path.exists():
        for r in read_jsonl(path):
            r["test_accuracy"] = math.nan if r.get("test_accuracy") is None else float(r["test_accuracy"])
            r["test_loss"] = math.nan if r.get("test_loss") is None else float(r["test_loss"])
            by_round.setdefault(r["round"], r)
    return [by_round[k] for k in sorted(by_round)]


def flat_row(r: dict[str, Any]) -> dict[str, Any]:
    cohort, completed = r["cohort_size"], r["completed"]
    train_s = [c["train_seconds"] for c in r.get("clients", []) if c.get("outcome") == "completed"]
    return {
        "round": r["round"],
        "accuracy": r["test_accuracy"],
        "loss": r["test_loss"],
        "bytes_down": r["bytes_down"],
        "bytes_up": r["bytes_up"],
        # Every sampled client downloads the model; only completed ones upload.
        "bytes_down_per_client": r["bytes_down"] / cohort if cohort else 0.0,
        "bytes_up_per_client": r["bytes_up"] / completed if completed else 0.0,
        "completed": completed,
        "cohort_size": cohort,
        "seconds": r["round_seconds"],
        "wait_seconds": r.get("wait_seconds", math.nan),
        "aggregate_seconds": r.get("aggregate_seconds", math.nan),
        "evaluate_seconds": r.get("evaluate_seconds", math.nan),
        "client_train_seconds_mean": statistics.fmean(train_s) if train_s else math.nan,
        "client_train_seconds_max": max(train_s) if train_s else math.nan,
        **{f"extra_{k}": v for k, v in sorted(r.get("extras", {}).items())},
    }


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def fmt_acc(a: float | None) -> str:
    return "—" if a is None or math.isnan(a) else f"{100 * a:.2f}%"


def summarize(rows: list[dict[str, Any]], wall_s: float, failed_rounds: int) -> dict[str, Any]:
    accs = [r["accuracy"] for r in rows if not math.isnan(r["accuracy"])]
    secs = [r["seconds"] for r in rows]
    n = len(rows)
    bd, bu = sum(r["bytes_down"] for r in rows), sum(r["bytes_up"] for r in rows)
    downloads, uploads = sum(r["cohort_size"] for r in rows), sum(r["completed"] for r in rows)
    return {
        "rounds_committed": n,
        "failed_round_attempts": failed_rounds,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        # FedGen reports the mean of the top-5 accuracies over all rounds (FEDGEN_FACTS section 5).
        "top5_mean_accuracy": statistics.fmean(sorted(accs)[-5:]) if accs else None,
        "bytes_down_total": bd,
        "bytes_up_total": bu,
        "bytes_down_per_round_mean": bd / n if n else None,
        "bytes_up_per_round_mean": bu / n if n else None,
        "bytes_down_per_client_per_round": bd / downloads if downloads else None,
        "bytes_up_per_client_per_round": bu / uploads if uploads else None,
        "mean_seconds_per_round": statistics.fmean(secs) if secs else None,
        "p50_seconds_per_round": statistics.median(secs) if secs else None,
        "p90_seconds_per_round": float(np.percentile(secs, 90)) if secs else None,
        "max_seconds_per_round": max(secs) if secs else None,
        "median_evaluate_seconds": statistics.median(r["evaluate_seconds"] for r in rows) if rows else None,
        "median_client_train_seconds": statistics.median(r["client_train_seconds_mean"] for r in rows)
        if rows
        else None,
        "wall_seconds": round(wall_s, 1),
    }


def print_tables(console: Console, rows: list[dict[str, Any]], s: dict[str, Any], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in (
        "after round",
        "test acc",
        "test loss",
        "bytes down",
        "bytes up",
        "down / client",
        "up / client",
        "done",
        "seconds",
    ):
        table.add_column(col, justify="right")
    shown = [r for r in rows if r["round"] == 0 or (r["round"] + 1) % 10 == 0 or r is rows[-1]]
    for r in shown:
        table.add_row(
            str(r["round"] + 1),
            fmt_acc(r["accuracy"]),
            "—" if math.isnan(r["loss"]) else f"{r['loss']:.4f}",
            fmt_bytes(r["bytes_down"]),
            fmt_bytes(r["bytes_up"]),
            fmt_bytes(r["bytes_down_per_client"]),
            fmt_bytes(r["bytes_up_per_client"]),
            f"{r['completed']}/{r['cohort_size']}",
            f"{r['seconds']:.2f}",
        )
    console.print(table)

    summary = Table(title="Summary", title_justify="left", show_header=False)
    summary.add_column("what")
    summary.add_column("value", justify="right")
    opt = lambda v, f: "—" if v is None else f(v)  # noqa: E731
    summary.add_row("rounds committed (failed attempts)", f"{s['rounds_committed']} ({s['failed_round_attempts']})")
    summary.add_row(
        "final / best / top-5 mean test accuracy",
        f"{fmt_acc(s['final_accuracy'])} / {fmt_acc(s['best_accuracy'])} / {fmt_acc(s['top5_mean_accuracy'])}",
    )
    summary.add_row(
        "bytes down / up per round (mean)",
        f"{opt(s['bytes_down_per_round_mean'], fmt_bytes)} / {opt(s['bytes_up_per_round_mean'], fmt_bytes)}",
    )
    summary.add_row(
        "bytes down / up per client per round",
        f"{opt(s['bytes_down_per_client_per_round'], fmt_bytes)} / "
        f"{opt(s['bytes_up_per_client_per_round'], fmt_bytes)}",
    )
    summary.add_row("bytes down / up, total", f"{fmt_bytes(s['bytes_down_total'])} / {fmt_bytes(s['bytes_up_total'])}")
    sec = lambda v: opt(v, lambda x: f"{x:.2f}")  # noqa: E731
    summary.add_row(
        "seconds per round: mean / p50 / p90 / max",
        f"{sec(s['mean_seconds_per_round'])} / {sec(s['p50_seconds_per_round'])} / "
        f"{sec(s['p90_seconds_per_round'])} / {sec(s['max_seconds_per_round'])}",
    )
    summary.add_row(
        "median server evaluation (10k images) s / median client training s",
        f"{sec(s['median_evaluate_seconds'])} / {sec(s['median_client_train_seconds'])}",
    )
    if "startup_seconds" in s:
        summary.add_row(
            "start-up (processes launched -> round 1 opened) / rounds 1..N",
            f"{s['startup_seconds']:.1f} s / {s['federation_seconds']:.1f} s",
        )
    summary.add_row("wall time (partition, start-up, rounds, shutdown)", f"{s['wall_seconds']:.1f} s")
    console.print(summary)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt  # fedgen.coordinator.plots selected the Agg backend

    x = [r["round"] + 1 for r in rows]
    fig, (ax_acc, ax_bytes, ax_sec) = plt.subplots(1, 3, figsize=(15, 4))
    ax_acc.plot(x, [100 * r["accuracy"] for r in rows], marker=".", markersize=3)
    ax_acc.set(xlabel="round", ylabel="test accuracy (%)", title="global model, full MNIST test set (10,000)")
    ax_acc.grid(alpha=0.3)
    ax_bytes.plot(x, [r["bytes_down"] / 1e6 for r in rows], label="down, all clients")
    ax_bytes.plot(x, [r["bytes_up"] / 1e6 for r in rows], label="up, all clients")
    ax_bytes.plot(x, [r["bytes_down_per_client"] / 1e6 for r in rows], "--", label="down, per client")
    ax_bytes.plot(x, [r["bytes_up_per_client"] / 1e6 for r in rows], "--", label="up, per client")
    ax_bytes.set(xlabel="round", ylabel="MB (serialized gRPC messages)", title="communication per round")
    ax_bytes.set_ylim(bottom=0)
    ax_bytes.legend(fontsize=8)
    ax_bytes.grid(alpha=0.3)
    ax_sec.plot(x, [r["seconds"] for r in rows], label="round (open -> commit)")
    ax_sec.plot(x, [r["evaluate_seconds"] for r in rows], label="server evaluation")
    ax_sec.plot(x, [r["client_train_seconds_max"] for r in rows], label="slowest client's training")
    ax_sec.set(xlabel="round", ylabel="seconds", title="time per round")
    ax_sec.set_ylim(bottom=0)
    ax_sec.legend(fontsize=8)
    ax_sec.grid(alpha=0.3)
    fig.suptitle(title)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)  # no wrapped tables in logs
    started = time.monotonic()
    try:
        data_dir = args.data_dir if args.data_dir is not None else shared_data_dir() / "mnist"
        train = load_idx_dataset(data_dir, "train")
        load_idx_dataset(data_dir, "test")  # fail here, not in the coordinator process
        out = args.out or Path(tempfile.mkdtemp(prefix=f"{NAME}-", dir=_runs_dir()))
        config = build_config(args, data_dir.resolve(), out / "state")
    except (BenchmarkError, DataError, ConfigError) as err:
        console.print(f"[red]{NAME}: {err}[/red]")
        return 2
    if (out / "state").exists() and any((out / "state").iterdir()):
        console.print(f"[red]{NAME}: {out / 'state'} already holds coordinator state; pass a fresh --out[/red]")
        return 2
    shards, hist = write_shards(
        train, out / "shards", args.clients, args.alpha, args.seed, samples_per_class=args.samples_per_class
    )
    console.print(
        f"{NAME}: {int(hist.sum())} training images over {args.clients} clients "
        f"(alpha={args.alpha}, sizes {int(hist.sum(1).min())}..{int(hist.sum(1).max())}, "
        f"labels per client {int((hist > 0).sum(1).min())}..{int((hist > 0).sum(1).max())}); "
        f"work dir {out}"
    )
    timeout_s = args.rounds * (args.round_timeout + 60) + 300
    failed = 0
    launched_unix = time.time()
    with LocalFederation(config, shards, out, client_threads=1) as fed:
        try:
            fed.start_coordinator()
            console.print(f"coordinator on {fed.address}; starting {args.clients} edge-client processes")
            fed.start_clients()
            rows, failed = run_federation(console, fed, args.rounds, timeout_s)
        except grpc.RpcError as err:
            console.print(
                f"[red]{NAME}: lost the coordinator's event stream: {err.code().name} {err.details()}; "
                f"see {out}/coordinator.log and {out}/client-*.log[/red]"
            )
            return 1
        except (RuntimeError, TimeoutError) as err:
            console.print(f"[red]{NAME}: {err}[/red]")
            return 1
        finished_unix = time.time()
        exit_codes = fed.wait_clients(timeout_s=60)
        clients_exited_s = time.time() - finished_unix
        try:  # the coordinator's own ledger (SQLite-backed) is the source of truth; events are the live view
            rows = [ledger_row_from_proto(r).to_dict() for r in fed.ledger()] or rows
        except grpc.RpcError as err:
            console.print(f"[yellow]GetLedger failed ({err.code().name}); using the streamed rows[/yellow]")
    # Leaving the block sent SIGTERM: a coordinator that stops cleanly exits 0.
    coord_code = fed.coordinator_proc.returncode if fed.coordinator_proc is not None else None
    wall_s = time.monotonic() - started
    raw = merge_with_ledger_file(rows, out / "state")
    flat = [flat_row(r) for r in raw]
    summary = summarize(flat, wall_s, failed)
    if raw:
        summary["startup_seconds"] = round(raw[0]["opened_unix_ms"] / 1000 - launched_unix, 1)
        summary["federation_seconds"] = round((raw[-1]["committed_unix_ms"] - raw[0]["opened_unix_ms"]) / 1000, 1)
    summary["clients_exit_seconds"] = round(clients_exited_s, 1)
    print_tables(
        console,
        flat,
        summary,
        f"FedAvg on MNIST: {args.clients} clients ({args.per_round}/round), alpha={args.alpha}, "
        f"{args.local_steps} steps x {args.batch_size}, lr {args.lr}*{args.lr_decay}^t",
    )
    console.print(f"client exit codes: {' '.join(str(c) for c in exit_codes)}; coordinator exit code: {coord_code}")

    bench_config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    bench_config["data_dir"] = str(data_dir)
    bench_config["out"] = str(out)
    coordinator_config = config.model_dump(mode="json")
    extra = {
        **summary,
        "config": {"benchmark": bench_config, "coordinator": coordinator_config, "client_threads": 1},
        "partition": {"train_images": int(hist.sum()), "label_histogram": hist.tolist()},
        "client_exit_codes": exit_codes,
        "coordinator_exit_code": coord_code,
    }
    json_path = write_results(NAME, command_line(SCRIPT, argv), flat, extra, results_dir=args.results_dir)
    png = plot(
        flat,
        args.results_dir / f"{NAME}.png",
        f"FedAvg, MNIST, {args.clients} clients ({args.per_round}/round), alpha={args.alpha}: "
        f"final {fmt_acc(summary['final_accuracy'])}, best {fmt_acc(summary['best_accuracy'])}",
    )
    console.print(f"results: {json_path}, {json_path.with_suffix('.csv')}, {png}\nlogs and state: {out}")

    problems = []
    if len(flat) != args.rounds:
        problems.append(f"only {len(flat)} of {args.rounds} rounds committed")
    if any(c != 0 for c in exit_codes):
        problems.append(f"client exit codes {exit_codes}")
    if coord_code != 0:
        problems.append(f"coordinator exited with {coord_code}")
    if problems:
        console.print(
            f"[red]{NAME}: the federation did not finish cleanly: {'; '.join(problems)}; "
            f"see {out}/coordinator.log and {out}/client-*.log[/red]"
        )
        return 1
    return 0


def _runs_dir() -> Path:
    path = REPO_ROOT / "runs"
    path.mkdir(exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
