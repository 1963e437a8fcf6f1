"""`fedgen-client`: run one edge client against a coordinator."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fedgen.core.data import DataError
from fedgen.core.task import TaskError
from fedgen.edge.conditions import Probe, combine, command_probe, on_mains_power
from fedgen.edge.connection import FleetCallError
from fedgen.edge.runner import ClientSettings, TaskRefused, run_client

#: Where the enrollment token may come from instead of the command line, which any local user can read.
TOKEN_ENV = "FEDGEN_ENROLLMENT_TOKEN"


class TokenError(ValueError):
    """No enrollment token, or one that cannot be read."""


def resolve_token(token: str | None, token_file: Path | None, environ: dict[str, str]) -> str:
    """The enrollment token from --token, --token-file or $FEDGEN_ENROLLMENT_TOKEN, in that order."""
    if token_file is not None:
        try:
            lines = token_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"--token-file {token_file}: cannot read it ({err})") from None
        token = lines[0].strip() if lines else ""
        if not token:
            raise TokenError(f"--token-file {token_file} is empty: its first line must be the enrollment token")
        return token
    if token:
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise TokenError(f"no enrollment token: give --token-file PATH, set ${TOKEN_ENV}, or --token")
    return token


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedgen-client", description="Run a FedGen edge client.")
    p.add_argument("--coordinator", required=True, help="coordinator address, e.g. 10.0.0.5:50051")
    p.add_argument("--data", required=True, type=Path, help="this device's shard file (.npz from `fedgen partition`)")
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token", help=f"enrollment token (any local user can read it in ps: prefer --token-file or ${TOKEN_ENV})"
    )
    tokens.add_argument("--token-file", type=Path, help="a file holding the enrollment token (its first line)")
    p.add_argument(
        "--task",
        default="mnist",
        help="the task to train: a built-in's name (mnist, fashion-mnist, fashion-mnist-resnet, cifar10, har) "
        "or an installed task's import path package.module:Class (default mnist)",
    )
    p.add_argument("--client-id", default="", help="stable id to join as (default: assigned by the coordinator)")
    p.add_argument("--cache-dir", type=Path, default=None, help="artifact cache (default ~/.cache/fedgen/<id>)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--onednn",
        choices=["auto", "on", "off"],
        default="auto",
        help="oneDNN kernels: auto = timed for the task at start-up (small models never load them)",
    )
    p.add_argument(
        "--memory-budget-mb",
        type=int,
        default=0,
        help="memory this client may use, MiB; it sizes its training to fit and declines tasks that "
        "cannot (default: what the OS reports available)",
    )
    when = p.add_argument_group("when to train (default: always)")
    when.add_argument("--only-on-mains", action="store_true", help="train only on mains power (Linux sysfs)")
    when.add_argument(
        "--ready-command",
        default="",
        help="a program asked before every poll: exit 0 = ready, else its first output line is "
        "the reason (e.g. a check that the link is unmetered)",
    )
    p.add_argument(
        "--link-down-mbps",
        type=float,
        default=0.0,
        help="this device's downlink as you know it, Mbit/s (seeds the coordinator's estimate until "
        "it has measured the link; default: unknown)",
    )
    p.add_argument("--link-up-mbps", type=float, default=0.0, help="the same for the uplink")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--call-timeout-s",
        type=float,
        default=30.0,
        help="deadline of each call to the coordinator; a call past it is retried with backoff (default 30)",
    )
    p.add_argument(
        "--give-up-after-s",
        type=float,
        default=600.0,
        help="how long one call is retried while the coordinator is unreachable or hung (default 600)",
    )
    tls = p.add_argument_group("TLS (default: plaintext)")
    tls.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    tls.add_argument(
        "--tls-ca", type=Path, help="PEM CA bundle that signed the coordinator's certificate (implies --tls)"
    )
    tls.add_argument("--tls-cert", type=Path, help="PEM client certificate, for mutual TLS (with --tls-key)")
    tls.add_argument("--tls-key", type=Path, help="PEM client private key, for mutual TLS")
    tls.add_argument("--tls-server-name", default="", help="name to verify the server certificate against")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _readiness(args: argparse.Namespace) -> Probe | None:
    probes: list[Probe] = []
    if args.only_on_mains:
        probes.append(on_mains_power)
    if args.ready_command:
        probes.append(command_probe(args.ready_command))
    return combine(probes) if probes else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = resolve_token(args.token, args.token_file, dict(os.environ))
    except TokenError as err:
        print(f"fedgen-client: {err}", file=sys.stderr)
        return 2
    if not args.data.exists():
        print(f"fedgen-client: data file {args.data} does not exist", file=sys.stderr)
        return 2
    for flag, path in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and not path.is_file():
            print(f"fedgen-client: {flag} {path} is not a readable file", file=sys.stderr)
            return 2
    if (args.tls_cert is None) != (args.tls_key is None):
        print("fedgen-client: --tls-cert and --tls-key go together (mutual TLS)", file=sys.stderr)
        return 2
    settings = ClientSettings(
        coordinator=args.coordinator,
        enrollment_token=token,
        data_path=args.data,
        client_id=args.client_id,
        cache_dir=args.cache_dir,
        threads=args.threads,
        memory_budget_mb=args.memory_budget_mb,
        task=args.task,
        onednn=args.onednn,
        seed=args.seed,
        call_timeout_s=args.call_timeout_s,
        give_up_after_s=args.give_up_after_s,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        use_tls=args.tls,
        readiness=_readiness(args),
        link_down_bps=int(max(args.link_down_mbps, 0) * 1e6),
        link_up_bps=int(max(args.link_up_mbps, 0) * 1e6),
    )
    try:
        summary = run_client(settings)
    except (TaskError, DataError, TaskRefused) as err:  # the task or the data does not fit: a usage error
        print(f"fedgen-client: {err}", file=sys.stderr)
        return 2
    except FleetCallError as err:
        print(f"fedgen-client: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    logging.getLogger("fedgen.edge").info(
        "finished: %d round(s) trained, %d rejected, %d declined, %d B down, %d B up",
        summary.rounds_trained,
        summary.updates_rejected,
        summary.tasks_declined,
        summary.bytes_down,
        summary.bytes_up,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
