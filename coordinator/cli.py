"""`fedgen`: serve a coordinator, partition data into client shards, or run the local demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

try:
    from fedgen.coordinator.config import ConfigError, CoordinatorConfig, load_config
except ImportError as _missing:  # the base install is the edge client; the coordinator is an extra
    raise SystemExit(
        f"fedgen: {_missing.name} is missing: the coordinator needs its extra, "
        "pip install 'fedgen-edge[coordinator]' (or pip install '.[coordinator]' from a checkout)"
    ) from None
from fedgen.coordinator.engine import TaskMismatch
from fedgen.coordinator.sqlite_store import StoreError
from fedgen.coordinator.state_lock import StateDirBusy
from fedgen.core.data import DataError
from fedgen.core.files import atomic_write
from fedgen.core.task import TaskError

_LOGGER = logging.getLogger("fedgen.coordinator")
#: Libraries that chat at INFO about things an operator need not see (quantiser steps, gRPC internals).
QUIET_LOGGERS = ("grpc", "onnxruntime.quantization")


def _setup_logging(level: str) -> None:
    """The one place the coordinator's processes configure logging."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))


# ----------------------------------------------------------------------------- serve
class StartError(Exception):
    """The coordinator cannot start with this state folder or address: one line, exit 2."""


def _os_reason(err: OSError) -> str:
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror or err}{where}"


async def _serve(config: CoordinatorConfig, port_file: Path | None, linger_s: float, exit_when_finished: bool) -> int:
    from fedgen.coordinator.server import build_federation, create_server

    try:
        federation = await build_federation(config)
    except OSError as err:  # the state folder: missing parent, not a folder, read-only, full disk
        raise StartError(f"cannot use state_dir {config.state_path}: {_os_reason(err)}") from None
    except StoreError as err:
        raise StartError(str(err)) from None
    try:
        running = await create_server(config.server.address, federation)
    except (OSError, ValueError) as err:
        await federation.close()
        raise StartError(str(err)) from None
    except BaseException:
        await federation.close()
        raise
    if port_file is not None:
        atomic_write(port_file, str(running.port).encode())
    _LOGGER.info("serving on %s (port %d), state in %s", config.server.address, running.port, config.state_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    assert running.engine_task is not None
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({running.engine_task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if running.engine_task.done() and not stop.is_set():
        if running.engine_task.exception() is not None:
            _LOGGER.error("round engine failed", exc_info=running.engine_task.exception())
            await running.stop(1.0)
            return 1
        if exit_when_finished:
            # Let polling clients hear DONE before the socket goes away.
            until = time.monotonic() + linger_s
            while time.monotonic() < until and not federation.all_told_done() and not stop.is_set():
                await asyncio.sleep(0.1)
        else:
            _LOGGER.info("federation finished; still serving Control and DONE until stopped (SIGTERM/Ctrl-C)")
            await stop.wait()
    stopper.cancel()
    await running.stop(config.server.shutdown_grace_s)
    _LOGGER.info("coordinator stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        overrides: dict[str, Any] = {}
        if args.address:
            overrides["server"] = {"address": args.address}
        if args.state_dir:
            overrides["state_dir"] = str(args.state_dir)
        if args.metrics_address:
            overrides["metrics"] = {"address": args.metrics_address}
        config = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"fedgen serve: invalid config: {err}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(config, args.port_file, args.linger_s, args.exit_when_finished))
    except (TaskError, DataError, TaskMismatch, StateDirBusy, StartError) as err:  # what it was started with
        print(f"fedgen serve: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError, StoreError) as err:
        print(f"fedgen serve: {err}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------- partition
def cmd_partition(args: argparse.Namespace) -> int:
    from fedgen.coordinator.local import write_shards
    from fedgen.core.data import describe_histogram
    from fedgen.core.task import prepare

    try:
        task = prepare(args.task)
        source = str(args.data_dir) if args.data_dir else "builtin"
        train = task.check(task.task.read_source(source, "train"), f"task {task.task.name!r} data in {source}")
        paths, hist = write_shards(train, args.out, args.clients, args.alpha, args.seed, args.samples_per_class)
    except (TaskError, DataError, ValueError) as err:
        print(f"fedgen partition: {err}", file=sys.stderr)
        return 2
    print(describe_histogram(hist))
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgen", description="FedGen federated learning over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the coordinator")
    serve.add_argument("--config", type=Path, help="TOML config file (see examples/coordinator.toml)")
    serve.add_argument("--address", help="override server.address, e.g. 0.0.0.0:50051")
    serve.add_argument("--state-dir", type=Path, help="override state_dir")
    serve.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    serve.add_argument(
        "--metrics-address", help="override metrics.address: serve Prometheus metrics here, e.g. 127.0.0.1:9464"
    )
    serve.add_argument(
        "--exit-when-finished",
        action="store_true",
        help="exit after the last round (once clients heard DONE) instead of serving on",
    )
    serve.add_argument(
        "--linger-s",
        type=float,
        default=15.0,
        help="with --exit-when-finished: wait at most this long for clients to hear DONE",
    )
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=cmd_serve)

    part = sub.add_parser("partition", help="split a dataset into per-client shard files (Dirichlet label skew)")
    part.add_argument("--task", default="mnist", help="the task whose data this is (name or package.module:Class)")
    part.add_argument("--data-dir", type=Path, help="what the task reads its data from (default: the task's own)")
    part.add_argument("--out", type=Path, required=True)
    part.add_argument("--clients", type=int, default=10)
    part.add_argument("--alpha", type=float, default=0.1)
    part.add_argument("--samples-per-class", type=int, default=None)
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--log-level", default="WARNING")
    part.set_defaults(func=cmd_partition)

    from fedgen.coordinator.demo import add_demo_parser
    from fedgen.coordinator.export_cli import add_export_parser

    add_demo_parser(sub)
    add_export_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
