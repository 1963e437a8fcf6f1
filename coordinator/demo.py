"""`fedgen demo`: a real federation on this machine, watched live over the Control service.

A coordinator process and N edge-client processes talk over loopback gRPC; this process
only partitions the data, starts them, and renders the round events it streams.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fedgen.coordinator.config import ConfigError, load_config
from fedgen.coordinator.ledger import LedgerRow
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.coordinator.plots import plot_ledger
from fedgen.coordinator.wire import ledger_row_from_proto
from fedgen.core.data import DataError, builtin_data_dir, load_idx_dataset
from fedgen.v1 import control_pb2


def add_demo_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = sub.add_parser("demo", help="run a whole federation on this machine with live progress")
    demo.add_argument("--data-dir", type=Path, help="IDX files (default: the MNIST subset shipped in the package)")
    demo.add_argument("--strategy", default="fedgen", help="fedgen | fedavg | fedprox")
    demo.add_argument("--clients", type=int, default=8, help="edge-client processes")
    demo.add_argument("--per-round", type=int, default=4, help="clients sampled per round")
    demo.add_argument("--rounds", type=int, default=30)
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (smaller = more non-IID)")
    demo.add_argument("--local-steps", type=int, default=20)
    demo.add_argument("--batch-size", type=int, default=32)
    demo.add_argument("--lr", type=float, default=0.01, help="client SGD learning rate (FedGen official: 0.01)")
    demo.add_argument("--seed", type=int, default=0)
    bw = demo.add_argument_group("bandwidth (see [bandwidth] in examples/coordinator.toml)")
    bw.add_argument(
        "--encoding-policy",
        default="adaptive",
        choices=["adaptive", "fixed"],
        help="adaptive: per client, the most faithful encodings that fit --transfer-budget; "
        "fixed: the three encodings below for everyone",
    )
    bw.add_argument("--transfer-budget", type=float, default=30.0, help="seconds per client-round (adaptive)")
    bw.add_argument("--model-encoding", default="fp32", help="fixed policy: fp32 | fp16[+zstd] | int8[+zstd]")
    bw.add_argument("--generator-encoding", default="fp32", help="fixed policy: fp32 | fp16 | int8 | int4, [+zstd]")
    bw.add_argument(
        "--upload-encoding",
        default="fp32",
        help="fixed policy: fp32 | fp16[+zstd] | int8[+zstd] | topk<percent>[+zstd]",
    )
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the ledger, plot and logs go")
    demo.add_argument("--log-level", default="WARNING")
    demo.set_defaults(func=cmd_demo)


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB"


def _round_table(rows: list[LedgerRow], status: str) -> Table:
    table = Table(title=f"FedGen federation — {status}", title_justify="left")
    for col in ("round", "clients", "test acc", "local acc", "loss", "down", "up", "sec"):
        table.add_column(col, justify="right")
    for r in rows[-15:]:
        local = r.extras.get("federated_accuracy")
        table.add_row(
            str(r.round),
            f"{r.completed}/{r.cohort_size}",
            _fmt_percent(r.test_accuracy),
            "—" if local is None else f"{100 * local:.2f}%",
            "—" if math.isnan(r.test_loss) else f"{r.test_loss:.3f}",
            _fmt_bytes(r.bytes_down),
            _fmt_bytes(r.bytes_up),
            f"{r.round_seconds:.2f}",
        )
    return table


def _fmt_percent(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def cmd_demo(args: argparse.Namespace) -> int:
    console = Console(width=max(100, Console().width))
    try:
        config = load_config(
            None,
            {
                "state_dir": str(args.out / "state"),
                "server": {"address": "127.0.0.1:0"},
                "federation": {
                    "strategy": args.strategy,
                    "rounds": args.rounds,
                    "clients_per_round": args.per_round,
                    "min_completed": max(1, args.per_round // 2),
                    "round_timeout_s": 60.0,
                    "seed": args.seed,
                },
                "training": {"local_steps": args.local_steps, "batch_size": args.batch_size, "learning_rate": args.lr},
                "data": {"test_data_dir": str(args.data_dir) if args.data_dir else "builtin"},
                "bandwidth": {
                    "policy": args.encoding_policy,
                    "transfer_budget_s": args.transfer_budget,
                    "model_encoding": args.model_encoding,
                    "generator_encoding": args.generator_encoding,
                    "upload_encoding": args.upload_encoding,
                },
            },
        )
        data_dir = args.data_dir or builtin_data_dir()
        train = load_idx_dataset(data_dir, "train")
        test = load_idx_dataset(data_dir, "test")
    except (ConfigError, DataError) as err:
        console.print(f"[red]fedgen demo: {err}[/red]")
        return 2
    if args.per_round > args.clients:
        console.print(f"[red]fedgen demo: --per-round ({args.per_round}) exceeds --clients ({args.clients})[/red]")
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    shards, hist = write_shards(train, args.out / "shards", args.clients, args.alpha, args.seed, test=test)
    console.print(
        _histogram_table(
            hist,
            f"Non-IID split of {len(train)} images from {data_dir} (Dirichlet alpha={args.alpha}, seed {args.seed})",
        )
    )
    started = time.monotonic()
    rows: list[LedgerRow] = []
    with LocalFederation(config, shards, args.out) as fed:
        fed.start_coordinator()
        console.print(f"coordinator on {fed.address}; starting {args.clients} edge-client processes")
        fed.start_clients()
        status = "waiting for clients"
        try:
            with Live(_round_table(rows, status), console=console, refresh_per_second=4) as live:
                for event in fed.events(timeout_s=args.rounds * 120 + 120):
                    kind = event.kind
                    if kind == control_pb2.RoundEvent.KIND_ROUND_OPENED:
                        status = f"round {event.round}: training on {event.cohort_size} clients"
                    elif kind == control_pb2.RoundEvent.KIND_UPDATE_ACCEPTED:
                        status = f"round {event.round}: {event.updates_received}/{event.cohort_size} updates in"
                    elif kind == control_pb2.RoundEvent.KIND_UPDATE_REJECTED:
                        status = f"round {event.round}: rejected {event.client_id}: {event.message}"
                    elif kind == control_pb2.RoundEvent.KIND_ROUND_COMMITTED:
                        rows.append(ledger_row_from_proto(event.ledger_row))
                        status = f"round {event.round} committed"
                    elif kind == control_pb2.RoundEvent.KIND_ROUND_FAILED:
                        status = f"round {event.round} failed: {event.message}"
                    elif kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED:
                        status = "finished"
                    live.update(_round_table(rows, status))
        except grpc.RpcError as err:
            console.print(f"[red]lost the coordinator's event stream: {err.code().name} {err.details()}[/red]")
            return 1
        exit_codes = fed.wait_clients(timeout_s=60)
    elapsed = time.monotonic() - started
    ledger_jsonl = args.out / "state" / "ledger.jsonl"
    ledger_csv = args.out / "state" / "ledger.csv"
    plot = plot_ledger(rows, args.out / "ledger.png", f"{args.strategy}, {args.clients} clients, alpha={args.alpha}")
    _print_summary(console, rows, elapsed, exit_codes)
    console.print(
        f"round ledger (JSON lines): {ledger_jsonl}\nround ledger (CSV):        {ledger_csv}\n"
        f"plot (PNG):                {plot}\nlogs:                      {args.out}/*.log"
    )
    (args.out / "summary.json").write_text(json.dumps(_summary(rows, elapsed), indent=2))
    return 0 if rows and len(rows) == args.rounds else 1


def _histogram_table(hist: Any, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("client")
    table.add_column("n", justify="right")
    for label in range(hist.shape[1]):
        table.add_column(str(label), justify="right")
    for k, counts in enumerate(hist):
        table.add_row(f"client-{k:02d}", str(int(counts.sum())), *[str(int(c)) if c else "·" for c in counts])
    return table


def _summary(rows: list[LedgerRow], elapsed: float) -> dict[str, Any]:
    accs = [r.test_accuracy for r in rows if not math.isnan(r.test_accuracy)]
    return {
        "rounds": len(rows),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "bytes_down_total": sum(r.bytes_down for r in rows),
        "bytes_up_total": sum(r.bytes_up for r in rows),
        "mean_round_seconds": sum(r.round_seconds for r in rows) / len(rows) if rows else None,
        "wall_seconds": round(elapsed, 1),
        "encodings": _encodings(rows),
    }


def _encodings(rows: list[LedgerRow]) -> dict[str, int]:
    """How many client-rounds travelled in each 'model / artifacts / upload' combination."""
    combos = Counter(
        " / ".join(
            [
                c.transfer.model_encoding or "-",
                ", ".join(c.transfer.artifact_encodings.values()) or "-",
                c.transfer.upload_encoding or "-",
            ]
        )
        for r in rows
        for c in r.clients
        if c.outcome == "completed"
    )
    return dict(combos.most_common())


def _print_summary(console: Console, rows: list[LedgerRow], elapsed: float, exit_codes: list[int | None]) -> None:
    s = _summary(rows, elapsed)
    console.print()
    table = Table(title="Summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("rounds committed", str(s["rounds"]))
    table.add_row("final test accuracy", _fmt_percent(s["final_accuracy"]))
    table.add_row("best test accuracy", _fmt_percent(s["best_accuracy"]))
    table.add_row("bytes down, total", _fmt_bytes(s["bytes_down_total"]))
    table.add_row("bytes up, total", _fmt_bytes(s["bytes_up_total"]))
    client_rounds = sum(r.completed for r in rows)
    if client_rounds:
        table.add_row("bytes down per client per round", _fmt_bytes(s["bytes_down_total"] / client_rounds))
        table.add_row("bytes up per client per round", _fmt_bytes(s["bytes_up_total"] / client_rounds))
    for i, (combo, n) in enumerate(s["encodings"].items()):
        if i < 3:
            table.add_row("encodings (model / generator / upload)" if i == 0 else "", f"{combo}: {n} client-rounds")
    table.add_row(
        "mean seconds per round", "—" if s["mean_round_seconds"] is None else f"{s['mean_round_seconds']:.2f}"
    )
    table.add_row("wall time", f"{elapsed:.1f} s")
    table.add_row("client exit codes", " ".join(str(c) for c in exit_codes))
    console.print(table)
