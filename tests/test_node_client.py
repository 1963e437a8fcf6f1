"""The .proto files are all a third party needs: a Node.js client (tests/node_client/client.js,
@grpc/grpc-js + @grpc/proto-loader, no generated code) against a real coordinator process.

The Node client is the federation's only client: it joins, long-polls until TRAIN, downloads
the global model in two calls (the second resuming where the first stopped), checks its sha256,
sends a Heartbeat, makes deliberately bad calls and leaves.

Needs `node` and `npm` on PATH; without them the test skips, except under CI (env CI set), where
it fails. CI installs the client's packages with
`npm ci --prefix tests/node_client --no-audit --no-fund` (the fixture below runs it if needed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation

REPO = Path(__file__).resolve().parents[1]
NODE_CLIENT = REPO / "tests" / "node_client"
TOKEN = "node-client-enrollment-token"


def _node_tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if path is None)
        message = f"{missing} not on PATH: the Node.js client test cannot run"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI must never skip it (install Node.js 18+)")
        pytest.skip(message)
    return node, npm


@pytest.fixture(scope="module")
def node() -> str:
    """The node executable, with tests/node_client/node_modules installed from the lock file."""
    node, npm = _node_tools()
    modules = NODE_CLIENT / "node_modules" / "@grpc"
    if not ((modules / "grpc-js").is_dir() and (modules / "proto-loader").is_dir()):
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"npm ci failed in {NODE_CLIENT}:\n{proc.stdout}\n{proc.stderr}"
    return node


@pytest.fixture
def coordinator(tmp_path: Path):
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": "fedavg",
                "rounds": 1,
                "clients_per_round": 1,
                "min_clients": 1,
                "min_completed": 1,
                "round_timeout_s": 60,
            },
            # The MNIST subset shipped in the package: no data files needed, so nothing to skip on.
            "data": {"test_data_dir": "builtin"},
            # A tight per-client rate: the client's later calls are refused with a pushback
            # trailer at first, and must get through by retrying after it.
            "auth": {"enrollment_tokens": [TOKEN], "client_requests_per_second": 2, "client_burst": 3},
        }
    )
    with LocalFederation(config=config, shards=[], work_dir=tmp_path / "work") as fed:
        fed.start_coordinator()  # the Node client is the only client: no Python clients start
        yield fed


@pytest.mark.integration
def test_node_client_speaks_fleet_from_the_protos_alone(node: str, coordinator: LocalFederation) -> None:
    log = coordinator.work_dir / "coordinator.log"
    try:
        proc = subprocess.run(
            [
                node,
                str(NODE_CLIENT / "client.js"),
                coordinator.address,
                TOKEN,
                "--timeout-s",
                "90",
                "--first-chunk-bytes",
                "1024",
            ],
            capture_output=True,
            text=True,
            timeout=150,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"node client did not finish: {err}\nstderr:\n{err.stderr}\ncoordinator log:\n{log.read_text()[-4000:]}"
        )
    context = (
        f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n"
        f"coordinator log (tail):\n{log.read_text()[-4000:]}"
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 1, context
    out = json.loads(lines[0])

    # Join, then a TRAIN task of the first (and only) round.
    assert out["client_id"], context
    assert out["federation_id"], context
    assert out["round"] == 0, context
    assert out["heartbeat_round"] == 0, context
    assert out["strategy"] == "fedavg", context
    assert out["task_id"], context

    # The global model, downloaded in two calls and verified.
    assert out["artifact_kind"] == "ARTIFACT_KIND_GLOBAL_MODEL"
    assert out["bytes"] == out["size_bytes"] > 1024
    assert out["sha256"] == out["artifact_id"]
    assert out["sha256_ok"] is True
    assert out["first_chunk_bytes"] == 1024  # max_chunk_bytes was honoured
    assert out["resumed_at"] == 1024  # the second call started where the first stopped
    assert out["resume_chunks"] >= 1
    # The bytes are the coordinator's blob with that id (content-addressed store).
    blob = Path(coordinator.config.state_dir) / "blobs" / out["artifact_id"][:2] / out["artifact_id"]
    assert blob.is_file(), f"no blob {blob}"
    assert blob.stat().st_size == out["bytes"]

    # Every deliberately bad call got the status fleet.proto documents, with a message.
    bad = out["bad_calls"]
    assert bad["poll_wrong_credential"]["code"] == "UNAUTHENTICATED", bad
    assert bad["poll_no_credential"]["code"] == "UNAUTHENTICATED", bad
    assert bad["join_bad_token"]["code"] == "UNAUTHENTICATED", bad
    assert bad["download_unknown_artifact"]["code"] == "NOT_FOUND", bad
    assert "0" * 64 in bad["download_unknown_artifact"]["details"], bad
    assert bad["download_offset_past_end"]["code"] == "OUT_OF_RANGE", bad
    assert bad["heartbeat_after_leave"]["code"] == "UNAUTHENTICATED", bad  # Leave revoked the credential
    # The rate limit was ridden out by retrying after the server's pushback, and nothing else was retried.
    assert out["retries"].get("RESOURCE_EXHAUSTED", 0) >= 1, context
    assert set(out["retries"]) == {"RESOURCE_EXHAUSTED"}, context
    for name, got in bad.items():
        assert got["details"], f"{name} answered {got['code']} without a message"
