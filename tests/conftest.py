"""Shared fixtures (where the real data lives), and the rule that keeps the integration marker honest.

A test that starts a process or opens a socket (a real gRPC server or channel, a subprocess, a
worker process) must be marked ``@pytest.mark.integration``; an unmarked test that tries is failed
at that call, so ``-m "not integration"`` really is the fast, self-contained set.
"""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

#: What starts a process or a socket: Python's own and gRPC's (whose sockets live in its C core).
_GUARDED: tuple[tuple[Any, str], ...] = (
    (subprocess.Popen, "__init__"),
    (multiprocessing.Process, "start"),
    (socket.socket, "connect"),
    (socket.socket, "bind"),
    (grpc, "server"),
    (grpc, "insecure_channel"),
    (grpc, "secure_channel"),
    (grpc.aio, "server"),
    (grpc.aio, "insecure_channel"),
    (grpc.aio, "secure_channel"),
)


@pytest.fixture(autouse=True)
def _integration_marker_is_honest(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("integration") is None:

        def refuse(*_args: object, **_kwargs: object) -> None:
            raise AssertionError(
                f"{request.node.nodeid} starts a process or opens a socket: mark it @pytest.mark.integration"
            )

        for owner, name in _GUARDED:
            monkeypatch.setattr(owner, name, refuse)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    path = SHARED_DATA / "mnist"
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {path} (tests read ../shared/data)")
    return path


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    path = SHARED_DATA / "fashion-mnist"
    if not (path / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not found at {path} (tests read ../shared/data)")
    return path
