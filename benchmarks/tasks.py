"""What each built-in task costs over the real system, how cost grows with the model, and FedGen
against FedAvg with a residual network on Fashion-MNIST.

1. Every built-in task, as real federations (a coordinator process and 3 edge-client processes over
   loopback gRPC, FedGen, 4 rounds of 20 local steps): parameters, latent and generator sizes, bytes
   per client-round with every artifact fp32 and with the compact encodings (model delta-int8+zstd,
   generator int8+zstd, uploads top-10% + zstd), seconds per round and the clients' peak RSS, all
   read from the ledger (rounds 1-3: those that ship a generator).
2. Cost against model size: the Fashion-MNIST ResNet at four widths (about 25 k to 1 M parameters):
   model bytes (fp32 and int8+zstd), CPU-seconds to encode the model, seconds per round (a real
   3-client federation, fp32), and the least-squares slope of each against the parameter count.
3. (--comparison-rounds N) FedGen vs FedAvg on Fashion-MNIST with the ResNet, Dirichlet alpha 0.1,
   20 clients, 10 per round, the official partition, the same for both strategies and every seed,
   run by reproduce_fedgen.py (its JSON is read back into this benchmark's).

CIFAR-10 and HAR data are synthetic (benchmarks/synthetic_data.py: no copy of either is available
offline); their costs do not depend on the pixel values, their accuracies mean nothing.

    python benchmarks/tasks.py                                   # sections 1 and 2
    python benchmarks/tasks.py --skip-costs --skip-growth --comparison-rounds 100 --comparison-seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import REPO_ROOT, RESULTS_DIR, BenchmarkError, command_line, shared_data_dir, write_results
from rich.console import Console
from rich.table import Table
from synthetic_data import write_cifar_binary, write_har_arrays
from task_family import FAMILY

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.generator import Generator, GeneratorConfig
from fedgen.coordinator.ledger import read_jsonl
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.coordinator.plots import save_figure
from fedgen.core.models import state_to_numpy
from fedgen.core.task import PreparedTask, prepare
from fedgen.export.codec import Encoding, bundle_to_bytes, encode_state

SCRIPT = "benchmarks/tasks.py"
BUILTINS = ("mnist", "fashion-mnist", "fashion-mnist-resnet", "cifar10", "har")
CLIENTS = 3
FP32 = {"policy": "fixed", "model_encoding": "fp32", "generator_encoding": "fp32", "upload_encoding": "fp32"}
COMPACT = {
    "policy": "fixed",
    "model_encoding": "delta-int8+zstd",
    "generator_encoding": "int8+zstd",
    "upload_encoding": "topk10+zstd",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds per cost federation (sections 1 and 2)")
    p.add_argument("--samples-per-class", type=int, default=200, help="training examples per class, all clients")
    p.add_argument("--skip-costs", action="store_true", help="skip section 1")
    p.add_argument("--skip-growth", action="store_true", help="skip section 2")
    p.add_argument("--comparison-rounds", type=int, default=0, help="section 3's rounds (0 = skip it)")
    p.add_argument("--comparison-seeds", default="0,1")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "tasks", help="work folder")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (round 0 ships no generator)")
    return args


# --------------------------------------------------------------------------- data


def task_source(name: str, work: Path) -> Path:
    if name == "mnist":
        return shared_data_dir() / "mnist"
    if "fashion" in name or name.startswith(("resnet", "task_family")):
        return shared_data_dir() / "fashion-mnist"
    if name == "cifar10":
        return write_cifar_binary(work / "data" / "cifar-10-batches-bin", per_file=400, test=2000)
    return write_har_arrays(work / "data" / "har", train=3000, test=1000)


# --------------------------------------------------------------------------- one federation


def federate(
    console: Console, task: str, source: Path, work: Path, bandwidth: dict[str, Any], rounds: int, per_class: int
) -> list[dict[str, Any]]:
    """A real federation of CLIENTS clients; its ledger rows."""
    prepared = prepare(task)
    train = prepared.check(prepared.task.read_source(str(source), "train"), str(source))
    shards, _ = write_shards(train, work / "shards", CLIENTS, alpha=1.0, seed=0, samples_per_class=per_class)
    config = parse_config(
        {
            "state_dir": str(work / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": "fedgen",
                "rounds": rounds,
                "clients_per_round": CLIENTS,
                "min_clients": CLIENTS,
                "min_completed": CLIENTS,
                "round_timeout_s": 300,
            },
            "training": {"local_steps": 20, "batch_size": 32, "learning_rate": 0.01},
            "task": {"name": task},
            "data": {"test_data_dir": str(source)},
            "bandwidth": bandwidth,
        }
    )
    with LocalFederation(config, shards, work) as fed:
        fed.start_coordinator(timeout_s=180)
        fed.start_clients()
        codes = fed.wait_clients(timeout_s=300 + 120 * rounds)
    rows = sorted(read_jsonl(work / "state" / "ledger.jsonl"), key=lambda r: r["round"])
    if codes != [0] * CLIENTS or len(rows) != rounds:
        raise BenchmarkError(f"{task}: clients exited {codes}, {len(rows)}/{rounds} rounds; see {work}")
    console.print(
        f"  {task} ({bandwidth['model_encoding']}): {rounds} rounds, final accuracy "
        f"{100 * rows[-1]['test_accuracy']:.2f}%"
    )
    return rows


def round_costs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per client-round means over the rounds that ship a generator (1..), from the ledger."""
    later = rows[1:]
    clients = [c for r in later for c in r["clients"] if c["outcome"] == "completed"]
    return {
        "bytes_down": statistics.fmean(c["bytes_down"] for c in clients),
        "bytes_up": statistics.fmean(c["bytes_up"] for c in clients),
        "round_seconds": statistics.median(r["round_seconds"] for r in later),
        "client_peak_rss_mb": max(r["extras"].get("client_peak_rss_mb_max", float("nan")) for r in later),
        "generator_onnx_bytes": later[-1]["extras"]["generator_onnx_bytes"],
        "generator_seconds": statistics.fmean(r["extras"]["generator_seconds"] for r in later),
        "final_accuracy": rows[-1]["test_accuracy"],
    }


def generator_parameters(task: PreparedTask) -> int:
    """The generator FedGen trains for this task (its hint's layers, the task's latent)."""
    hint = task.task.generator
    config = GeneratorConfig(task.task.n_classes, hint.noise_dim, hint.hidden_dims, task.latent_dim)
    return sum(p.numel() for p in Generator(config).parameters())


# --------------------------------------------------------------------------- sections


def section_costs(console: Console, args: argparse.Namespace) -> list[dict[str, Any]]:
    console.print("[bold]1. Every built-in task over the real system[/bold]")
    rows = []
    for name in BUILTINS:
        task = prepare(name)
        source = task_source(name, args.out)
        runs = {}
        for label, bandwidth in (("fp32", FP32), ("compact", COMPACT)):
            work = args.out / "costs" / f"{name}-{label}"
            shutil.rmtree(work, ignore_errors=True)
            runs[label] = round_costs(
                federate(console, name, source, work, bandwidth, args.rounds, args.samples_per_class)
            )
        fp32, compact = runs["fp32"], runs["compact"]
        rows.append(
            {
                "section": "costs",
                "task": name,
                "parameters": task.parameters,
                "latent_dim": task.latent_dim,
                "generator_parameters": generator_parameters(task),
                "input": task.task.input.describe(),
                "fp32_bytes_down": round(fp32["bytes_down"]),
                "fp32_bytes_up": round(fp32["bytes_up"]),
                "compact_bytes_down": round(compact["bytes_down"]),
                "compact_bytes_up": round(compact["bytes_up"]),
                "compact_ratio": (compact["bytes_down"] + compact["bytes_up"])
                / (fp32["bytes_down"] + fp32["bytes_up"]),
                "generator_onnx_bytes": fp32["generator_onnx_bytes"],
                "round_seconds": fp32["round_seconds"],
                "compact_round_seconds": compact["round_seconds"],
                "generator_seconds": fp32["generator_seconds"],
                "client_peak_rss_mb": fp32["client_peak_rss_mb"],
                "final_accuracy_fp32": fp32["final_accuracy"],
                "final_accuracy_compact": compact["final_accuracy"],
                "synthetic_data": name in ("cifar10", "har"),
            }
        )
    table = Table(title=f"Built-in tasks: per client-round, rounds 1-{args.rounds - 1}, {CLIENTS} clients, FedGen")
    for col in ("task", "params", "latent", "fp32 down/up", "compact down/up", "ratio", "s/round", "peak RSS"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in rows:
        table.add_row(
            r["task"] + (" *" if r["synthetic_data"] else ""),
            f"{r['parameters']:,}",
            str(r["latent_dim"]),
            f"{r['fp32_bytes_down'] / 1e3:,.0f} / {r['fp32_bytes_up'] / 1e3:,.0f} KB",
            f"{r['compact_bytes_down'] / 1e3:,.0f} / {r['compact_bytes_up'] / 1e3:,.0f} KB",
            f"{r['compact_ratio']:.2f}",
            f"{r['round_seconds']:.2f}",
            f"{r['client_peak_rss_mb']:.0f} MB",
        )
    console.print(table)
    console.print(
        "* synthetic data (costs only). compact = model delta-int8+zstd, generator int8+zstd, "
        "uploads top-10% + zstd; down includes the model, the ONNX generator and the task message."
    )
    return rows


def _encode_cpu_seconds(state: dict[str, np.ndarray], encoding: Encoding, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        bundle_to_bytes(encode_state(state, encoding))
        times.append(time.process_time() - t0)
    return statistics.median(times)


def _slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)[0])


def section_growth(console: Console, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float]]:
    console.print("[bold]2. Cost against model size (the Fashion-MNIST ResNet at four widths)[/bold]")
    rows = []
    for path in FAMILY:
        task = prepare(path)
        state = state_to_numpy(task.model())
        fp32 = len(bundle_to_bytes(encode_state(state, Encoding())))
        int8 = len(bundle_to_bytes(encode_state(state, Encoding.parse("int8+zstd"))))
        work = args.out / "growth" / task.task.name
        shutil.rmtree(work, ignore_errors=True)
        costs = round_costs(
            federate(console, path, task_source(path, args.out), work, FP32, args.rounds, args.samples_per_class)
        )
        rows.append(
            {
                "section": "growth",
                "task": task.task.name,
                "parameters": task.parameters,
                "model_bytes_fp32": fp32,
                "model_bytes_int8_zstd": int8,
                "encode_cpu_s_fp32_zstd": _encode_cpu_seconds(state, Encoding.parse("fp32+zstd")),
                "encode_cpu_s_int8_zstd": _encode_cpu_seconds(state, Encoding.parse("int8+zstd")),
                "round_seconds": costs["round_seconds"],
                "client_peak_rss_mb": costs["client_peak_rss_mb"],
            }
        )
    params = [float(r["parameters"]) for r in rows]
    slopes = {
        "bytes_fp32_per_parameter": _slope(params, [r["model_bytes_fp32"] for r in rows]),
        "bytes_int8_zstd_per_parameter": _slope(params, [r["model_bytes_int8_zstd"] for r in rows]),
        "encode_int8_zstd_cpu_ms_per_100k_parameters": 1e8
        * _slope(params, [r["encode_cpu_s_int8_zstd"] for r in rows]),
        "round_seconds_per_100k_parameters": 1e5 * _slope(params, [r["round_seconds"] for r in rows]),
        "client_peak_rss_mb_per_100k_parameters": 1e5 * _slope(params, [r["client_peak_rss_mb"] for r in rows]),
    }
    table = Table(title=f"Cost against size ({CLIENTS} clients, FedGen, fp32 artifacts)")
    for col in ("model", "params", "fp32 bytes", "int8+zstd", "encode int8+zstd", "s/round", "peak RSS"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r["task"],
            f"{r['parameters']:,}",
            f"{r['model_bytes_fp32']:,}",
            f"{r['model_bytes_int8_zstd']:,}",
            f"{1000 * r['encode_cpu_s_int8_zstd']:.1f} ms",
            f"{r['round_seconds']:.2f}",
            f"{r['client_peak_rss_mb']:.0f} MB",
        )
    console.print(table)
    console.print("slopes (least squares over the four sizes): " + ", ".join(f"{k} {v:.4g}" for k, v in slopes.items()))
    return rows, slopes


def section_comparison(console: Console, args: argparse.Namespace) -> list[dict[str, Any]]:
    console.print("[bold]3. FedGen vs FedAvg, Fashion-MNIST ResNet, alpha 0.1, 20 clients (10 a round)[/bold]")
    command = [
        sys.executable,
        str(REPO_ROOT / "benchmarks" / "reproduce_fedgen.py"),
        "--task",
        "fashion-mnist-resnet",
        "--alphas",
        "0.1",
        "--seeds",
        args.comparison_seeds,
        "--strategies",
        "fedavg,fedgen",
        "--rounds",
        str(args.comparison_rounds),
        "--out",
        str(args.out / "comparison"),
        "--resume",
        "--results-dir",
        str(args.results_dir),
    ]
    started = time.monotonic()
    done = subprocess.run(command, check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"reproduce_fedgen.py exited {done.returncode}")
    summary = json.loads((args.results_dir / "reproduce_fedgen_fashion_resnet.json").read_text())
    console.print(f"section 3 took {time.monotonic() - started:.0f} s")
    return [{"section": "comparison", **row} for row in summary["rows"]]


def plot(costs: list[dict[str, Any]], growth: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    if costs:
        ax = axes[0]
        names = [r["task"] for r in costs]
        x = np.arange(len(names))
        fp32 = [(r["fp32_bytes_down"] + r["fp32_bytes_up"]) / 1e3 for r in costs]
        compact = [(r["compact_bytes_down"] + r["compact_bytes_up"]) / 1e3 for r in costs]
        ax.bar(x - 0.2, fp32, 0.4, label="fp32")
        ax.bar(x + 0.2, compact, 0.4, label="compact")
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.set(ylabel="KB per client-round (down + up)", title="built-in tasks")
        ax.legend()
    if growth:
        ax = axes[1]
        params = [r["parameters"] for r in growth]
        ax.loglog(params, [r["model_bytes_fp32"] / 1e3 for r in growth], "o-", label="model fp32 (KB)")
        ax.loglog(params, [r["model_bytes_int8_zstd"] / 1e3 for r in growth], "o-", label="model int8+zstd (KB)")
        ax.loglog(params, [r["round_seconds"] for r in growth], "s--", label="seconds per round")
        ax.set(xlabel="parameters", title="cost against model size")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    console = Console(width=None if sys.stdout.isatty() else 200)
    # The coordinator and client processes import the size family by path.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")])
    )
    # A skipped section keeps the rows an earlier run wrote (each row says which command made it).
    earlier_path = args.results_dir / "tasks.json"
    earlier = json.loads(earlier_path.read_text()) if earlier_path.exists() else {"rows": []}
    kept = {sec: [r for r in earlier["rows"] if r.get("section") == sec] for sec in ("costs", "growth", "comparison")}
    commands = dict(earlier.get("commands", {}))
    try:
        costs = kept["costs"] if args.skip_costs else section_costs(console, args)
        growth, slopes = (
            (kept["growth"], earlier.get("slopes", {})) if args.skip_growth else section_growth(console, args)
        )
        comparison = section_comparison(console, args) if args.comparison_rounds else kept["comparison"]
    except BenchmarkError as err:
        console.print(f"[red]tasks: {err}[/red]")
        return 1
    this = command_line(SCRIPT, argv)
    for section, ran in (
        ("costs", not args.skip_costs),
        ("growth", not args.skip_growth),
        ("comparison", bool(args.comparison_rounds)),
    ):
        if ran:
            commands[section] = this
    name = "tasks"
    json_path = write_results(
        name,
        this,
        [*costs, *growth, *comparison],
        {
            "commands": commands,
            "clients": CLIENTS,
            "rounds": args.rounds,
            "slopes": slopes,
            "compact_encodings": COMPACT,
        },
        results_dir=args.results_dir,
    )
    png = plot(costs, growth, args.results_dir / f"{name}.png")
    console.print(f"results: {json_path}, {json_path.with_suffix('.csv')}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
