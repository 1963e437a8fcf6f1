"""A real Prometheus server scrapes a running federation, and PromQL over its HTTP API agrees
with the ledger.

A coordinator process serves `/metrics` on loopback (`--metrics-address`); three edge-client
processes run three FedGen rounds; Prometheus (Debian's package) scrapes every second. Queries
through Prometheus's own API must return the committed round count, the ledger's bytes to the
byte, the generator's downloads by encoding, and the refused call the test made with a bad
credential, counted under its status code. A second coordinator asked to serve metrics on a port
that is taken exits 2 naming the address.

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`); without it the test
skips, except under CI (the CI environment variable set), where it is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.transport import bearer_metadata
from fedgen.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

ROUNDS = 3
CLIENTS = 3
TOKEN = "prometheus-test-enrollment-token"
OPERATOR = "prometheus-test-operator-token"

PROMETHEUS_CONF = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: fedgen
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)
    if found is None:
        message = "prometheus not found (Debian: apt-get install -y prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so this is a failure, not a skip")
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(Prometheus's port, the metrics port it scrapes); the coordinator is started by the test."""
    binary = _prometheus_binary()
    metrics_port, web_port = _free_port(), _free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(PROMETHEUS_CONF.format(port=metrics_port))
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - the child keeps its own descriptor
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={conf}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{(tmp_path / 'prometheus.log').read_text()}"
            try:
                _get(f"http://127.0.0.1:{web_port}/-/ready")
                break
            except OSError:
                assert time.monotonic() < deadline, "prometheus did not become ready in 60 s"
                time.sleep(0.2)
        yield web_port, metrics_port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _query(web_port: int, promql: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{web_port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = json.loads(_get(url))
    assert answer["status"] == "success", answer
    result: list[dict[str, object]] = answer["data"]["result"]
    return result


def _scalar(web_port: int, promql: str) -> float | None:
    result = _query(web_port, promql)
    if not result:
        return None
    value = result[0]["value"]
    assert isinstance(value, list)
    return float(value[1])


def _eventually(web_port: int, promql: str, expected: float, timeout_s: float = 30.0, tolerance: float = 0.0) -> None:
    """Scrapes are 1 s apart: the value a query returns may lag the coordinator by a scrape or two."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        seen = _scalar(web_port, promql)
        if seen is not None and abs(seen - expected) <= tolerance:
            return
        time.sleep(0.5)
    raise AssertionError(f"{promql} = {seen}, expected {expected}")


def test_prometheus_scrapes_a_federation(prometheus: tuple[int, int], mnist_dir: Path, tmp_path: Path) -> None:
    web_port, metrics_port = prometheus
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, tmp_path / "shards", n_clients=CLIENTS, alpha=1.0, seed=2, samples_per_class=60)
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "server": {"address": "127.0.0.1:0"},
            "federation": {
                "strategy": "fedgen",
                "rounds": ROUNDS,
                "clients_per_round": CLIENTS,
                "min_completed": CLIENTS,
                "round_timeout_s": 60,
            },
            "training": {"local_steps": 5},
            "fedgen": {"generator_steps": 5},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN], "operator_token": OPERATOR},
            "metrics": {"address": f"127.0.0.1:{metrics_port}"},
        }
    )
    with LocalFederation(config, shards, tmp_path / "fed") as fed:
        fed.start_coordinator()
        with grpc.insecure_channel(fed.address) as channel:  # one call refused for its credential
            with pytest.raises(grpc.RpcError) as refused:
                fleet_pb2_grpc.FleetStub(channel).Heartbeat(
                    fleet_pb2.HeartbeatRequest(), metadata=bearer_metadata("nobody.bad-secret"), timeout=10
                )
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        fed.start_clients(TOKEN)
        finished = [e for e in fed.events(timeout_s=300) if e.kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED]
        assert finished, "the federation did not finish"
        rows = fed.ledger()
        assert len(rows) == ROUNDS

        # The endpoint itself: Prometheus's text format, parsed by prometheus-client's parser.
        families = {
            f.name: f for f in text_string_to_metric_families(_get(f"http://127.0.0.1:{metrics_port}/metrics").decode())
        }
        assert families["fedgen_rounds_committed"].type == "counter"
        assert families["grpc_server_handling_seconds"].type == "histogram"

        # Through Prometheus: what it scraped agrees with the ledger.
        _eventually(web_port, "fedgen_rounds_committed_total", ROUNDS)
        _eventually(web_port, 'fedgen_round_bytes_total{direction="down"}', sum(r.bytes_down for r in rows))
        _eventually(web_port, 'fedgen_round_bytes_total{direction="up"}', sum(r.bytes_up for r in rows))
        _eventually(web_port, 'fedgen_round_clients_total{outcome="completed"}', sum(r.completed for r in rows))
        _eventually(web_port, "fedgen_updates_accepted_total", sum(r.completed for r in rows))
        _eventually(web_port, "fedgen_test_accuracy_ratio", rows[-1].test_accuracy, tolerance=1e-6)
        _eventually(web_port, "fedgen_generator_training_seconds_count", ROUNDS)
        _eventually(
            web_port,
            'grpc_server_handled_total{grpc_method="Heartbeat",grpc_code="UNAUTHENTICATED"}',
            1,
        )
        uploads_ok = _scalar(web_port, 'grpc_server_handled_total{grpc_method="UploadUpdate",grpc_code="OK"}')
        assert uploads_ok is not None and uploads_ok >= ROUNDS * CLIENTS
        by_artifact = {
            (str(s["metric"]["artifact"]), str(s["metric"]["encoding"]))  # type: ignore[index]
            for s in _query(web_port, 'fedgen_artifact_bytes_total{direction="down"} > 0')
        }
        assert any(kind == "model" for kind, _ in by_artifact), by_artifact
        assert any(kind == "generator_onnx" for kind, _ in by_artifact), by_artifact
        update_bytes = _scalar(web_port, 'sum(fedgen_artifact_bytes_total{direction="up",artifact="update"})')
        assert update_bytes is not None and update_bytes > 0
        # No client id anywhere among the labels: the label sets stay bounded.
        series = json.loads(
            _get(f"http://127.0.0.1:{web_port}/api/v1/series?match[]=" + urllib.parse.quote('{job="fedgen"}'))
        )
        labels = {value for s in series["data"] for value in s.values()}
        assert not any(value.startswith("client-") for value in labels)


def test_metrics_port_taken_is_a_clear_start_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedgen.coordinator",
                "serve",
                "--state-dir",
                str(tmp_path / "state"),
                "--address",
                "127.0.0.1:0",
                "--metrics-address",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr
    assert "metrics.address" in done.stderr
