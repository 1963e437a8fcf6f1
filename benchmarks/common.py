"""Helpers every benchmark shares: where the data is, what machine ran it, how results are written.

A benchmark writes `benchmarks/results/<name>.json` (the exact command, the date, the machine,
one flat row per measurement, plus summary keys) and a CSV of the same rows beside it.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


class BenchmarkError(RuntimeError):
    """A benchmark cannot run or did not finish; the message says why and where to look."""


def shared_data_dir() -> Path:
    """`<repo>/../shared/data`, the read-only folder of datasets (override with a benchmark's --data-dir)."""
    path = (REPO_ROOT.parent / "shared" / "data").resolve()
    if not path.is_dir():
        raise BenchmarkError(
            f"shared data folder not found: {path} (expected beside the repository); "
            "pass --data-dir with a folder of MNIST IDX files instead"
        )
    return path


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command as a user would retype it from the repo root: `python benchmarks/x.py --flag v`."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", script, *args])


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: cores, CPU, memory, OS, Python and library versions, compute device."""
    device = "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "grpcio": _version("grpcio"),
        "numpy": _version("numpy"),
        "device": device,
    }


def source_commit() -> dict[str, Any]:
    """The commit the measured code came from, and whether the working tree differed from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(status.strip())}


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null (a round that was not evaluated has NaN accuracy)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(
    name: str,
    command: str,
    rows: Sequence[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    results_dir: Path | None = None,
) -> Path:
    """Writes `<results_dir>/<name>.json` and `<name>.csv`; returns the JSON path."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    reserved = {"command", "date", "machine", "source", "rows"} & extra.keys()
    if reserved:
        raise ValueError(f"extra keys clash with reserved ones: {sorted(reserved)}")
    doc = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "machine": machine_info(),
        "source": source_commit(),
        **extra,
        "rows": list(rows),
    }
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(_json_safe(doc), indent=2) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(out_dir / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return json_path
