"""The coordinator behind nginx as a TLS-terminating gRPC reverse proxy.

A real coordinator serves plaintext gRPC on loopback; nginx terminates TLS (certificates from a
test CA made on the fly) and forwards HTTP/2 to it with `grpc_pass`. Three real edge-client
processes know only nginx's address, the CA and the certificate's name; they join, long-poll,
download, train and upload through the proxy until the federation finishes. nginx's access log
shows that their Fleet calls went through it; a direct call through nginx reaches the standard
health service over TLS, and a plaintext call to the TLS port fails.

Needs the `nginx` binary (Debian: `apt-get install -y nginx`). Without it the test skips, except
under CI (the CI environment variable set), where a missing nginx is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import certs
import grpc
import pytest
from certs import make_pki
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedgen.coordinator.config import parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.transport import channel_options
from fedgen.v1 import control_pb2

pytestmark = pytest.mark.integration

ROUNDS = 2
CLIENTS = 3
TOKEN = "nginx-proxy-enrollment-token"

# `{listen}` and `{http2}` depend on the nginx version: 1.25.1 replaced `listen ... http2` with `http2 on;`.
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    log_format grpc '$remote_addr "$request" $status $request_length $bytes_sent '
                    'grpc-status=$upstream_trailer_grpc_status header-grpc-status=$upstream_http_grpc_status';
    access_log {prefix}/access.log grpc;

    client_body_temp_path {prefix}/client_body_temp;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;

    server {{
        listen {listen};
        {http2}
        server_name {server_name};

        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;

        # Uploads are client-streamed in 64 KiB chunks; the whole stream counts as one body.
        client_max_body_size 64m;
        client_body_timeout 300s;

        location / {{
            grpc_pass grpc://127.0.0.1:{upstream_port};
            # PollTask holds a call open up to server.max_poll_wait_s (20 s); downloads and
            # uploads stream: give them far more than that.
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
            grpc_connect_timeout 10s;
        }}
    }}
}}
"""


def _nginx_binary() -> str:
    found = shutil.which("nginx") or next(
        (
            p
            for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
            if os.access(p, os.X_OK)
        ),
        None,
    )
    if found is None:
        message = "nginx not found (Debian: apt-get install -y nginx)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI is set, so this is a failure, not a skip")
        pytest.skip(message)
    return found


def _nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    assert match, f"cannot read the nginx version from {out.stderr!r}"
    return tuple(int(g) for g in match.groups())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_directive() -> str:
    """Workers keep the test's user: as root, nginx would otherwise drop them to `nobody`, which
    cannot reach the temp dirs inside pytest's private (0700) tmp tree."""
    if os.geteuid() != 0:
        return ""
    import grp
    import pwd

    return f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"


class Nginx:
    """One nginx (master + worker) in the foreground, everything it writes under `prefix`."""

    def __init__(self, binary: str, prefix: Path, upstream_port: int, cert: Path, key: Path) -> None:
        self.binary = binary
        self.prefix = prefix
        self.upstream_port = upstream_port
        self.cert = cert
        self.key = key
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = prefix / "nginx.conf"
        self.access_log = prefix / "access.log"
        self.error_log = prefix / "error.log"
        self.version = _nginx_version(binary)

    def _write_conf(self, port: int) -> None:
        if self.version >= (1, 25, 1):
            listen, http2 = f"127.0.0.1:{port} ssl", "http2 on;"
        else:
            listen, http2 = f"127.0.0.1:{port} ssl http2", ""
        self.conf.write_text(
            NGINX_CONF.format(
                prefix=self.prefix,
                user=_user_directive(),
                listen=listen,
                http2=http2,
                server_name=certs.SERVER_NAME,
                cert=self.cert,
                key=self.key,
                upstream_port=self.upstream_port,
            )
        )

    def _cmd(self, *extra: str) -> list[str]:
        # -e: the error log before the config is read (else the compiled-in /var/log/nginx/error.log).
        return [self.binary, "-p", f"{self.prefix}/", "-c", str(self.conf), "-e", str(self.error_log), *extra]

    def start(self, attempts: int = 3) -> int:
        """Writes the config, checks it with `nginx -t`, starts nginx and waits until its port accepts
        connections. The port is picked free just before; another process taking it in between is
        retried with a fresh port."""
        self.prefix.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            port = _free_port()
            self._write_conf(port)
            check = subprocess.run(self._cmd("-t"), capture_output=True, text=True)
            assert check.returncode == 0, f"nginx -t rejected {self.conf}:\n{check.stderr}"
            with open(self.prefix / "nginx.stdout", "ab") as log:  # nginx keeps its own descriptor
                self.proc = subprocess.Popen(self._cmd(), stdout=log, stderr=subprocess.STDOUT)
            if self._wait_listening(port):
                self.port = port
                return port
            self.stop()
        raise AssertionError(f"nginx did not start; its error log:\n{self._error_log_text()}")

    def _wait_listening(self, port: int, tries: int = 600) -> bool:
        assert self.proc is not None
        for _ in range(tries):
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # fast shutdown of master and workers
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _error_log_text(self) -> str:
        return self.error_log.read_text(errors="replace") if self.error_log.exists() else "(no error log)"

    def access_lines(self) -> list[str]:
        return self.access_log.read_text(errors="replace").splitlines() if self.access_log.exists() else []


@pytest.fixture
def nginx_binary() -> str:
    return _nginx_binary()


def _health_check(channel: grpc.Channel) -> health_pb2.HealthCheckResponse:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)


def test_federation_through_nginx_tls_proxy(nginx_binary: str, mnist_dir: Path, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, tmp_path / "shards", n_clients=CLIENTS, alpha=1.0, seed=4, samples_per_class=200)
    config = parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "server": {"address": "127.0.0.1:0"},  # plaintext, loopback only: nginx is the front door
            "federation": {
                "strategy": "fedavg",
                "rounds": ROUNDS,
                "clients_per_round": CLIENTS,
                "min_clients": CLIENTS,
                "min_completed": CLIENTS,
                "round_timeout_s": 60,
                "seed": 4,
            },
            "training": {"local_steps": 20, "learning_rate": 0.05},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN]},
        }
    )
    fed = LocalFederation(config, shards, tmp_path / "fed")
    nginx: Nginx | None = None
    try:
        fed.start_coordinator()
        nginx = Nginx(nginx_binary, tmp_path / "nginx", fed.port, pki.server_cert, pki.server_key)
        nginx_port = nginx.start()
        assert nginx_port != fed.port

        # A direct call through nginx over TLS, verified against the test CA under the certificate's
        # name: the standard health service answers SERVING once the coordinator has recovered its state.
        creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
        tls_options = [*channel_options(), ("grpc.ssl_target_name_override", certs.SERVER_NAME)]
        with grpc.secure_channel(f"127.0.0.1:{nginx_port}", creds, tls_options) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            watch.cancel()
            assert _health_check(channel).status == health_pb2.HealthCheckResponse.SERVING

        # Plaintext HTTP/2 to nginx's TLS port: no answer a gRPC client can use.
        with grpc.insecure_channel(f"127.0.0.1:{nginx_port}", channel_options()) as plain:
            with pytest.raises(grpc.RpcError) as err:
                _health_check(plain)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())

        # The edge clients know only nginx: its address, the CA and the certificate's name.
        fed.client_address = f"127.0.0.1:{nginx_port}"
        fed.extra_client_args = ["--tls-ca", str(pki.ca_cert), "--tls-server-name", certs.SERVER_NAME]
        fed.start_clients()

        events = list(fed.events(timeout_s=600))
        assert events, "no round events"
        assert events[-1].kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED, events[-1]
        committed = [e.round for e in events if e.kind == control_pb2.RoundEvent.KIND_ROUND_COMMITTED]
        assert committed == list(range(ROUNDS)), committed
        assert not [
            e
            for e in events
            if e.kind in (control_pb2.RoundEvent.KIND_ROUND_FAILED, control_pb2.RoundEvent.KIND_UPDATE_REJECTED)
        ]

        codes = fed.wait_clients(timeout_s=120)
        assert codes == [0] * CLIENTS, (codes, _client_logs(fed))

        rows = fed.ledger()
        assert [r.round for r in rows] == list(range(ROUNDS))
        for r in rows:
            assert (r.cohort_size, r.completed, r.dropped, r.rejected) == (CLIENTS, CLIENTS, 0, 0), r
            assert sorted(c.client_id for c in r.clients) == sorted(s.stem for s in shards)
            assert all(c.outcome == "completed" and c.bytes_up > 0 and c.bytes_down > 0 for c in r.clients)
        assert rows[-1].test_accuracy > 0.3, [r.test_accuracy for r in rows]  # chance is 0.1
    finally:
        fed.close()
        if nginx is not None:
            nginx.stop()

    # Every Fleet call of the clients went through nginx: HTTP/2 over TLS, forwarded with grpc_pass.
    assert nginx is not None
    lines = nginx.access_lines()
    fleet = [line for line in lines if "/fedgen.v1.Fleet/" in line]
    assert fleet, "no Fleet calls in nginx's access log:\n" + "\n".join(lines)

    def calls(method: str) -> list[str]:
        """The access-log lines of successful calls of `method` (HTTP 200, gRPC status OK in the trailers)."""
        return [
            line
            for line in fleet
            if f'"POST /fedgen.v1.Fleet/{method} HTTP/2.0" 200 ' in line and "grpc-status=0 " in line
        ]

    assert len(calls("Join")) == CLIENTS, fleet
    assert calls("PollTask"), fleet
    # Each client downloaded the global model at least once and uploaded its update every round
    # (a retried upload is acknowledged again under its idempotency key, hence at least).
    assert len(calls("DownloadArtifact")) >= CLIENTS, fleet
    assert len(calls("UploadUpdate")) >= CLIENTS * ROUNDS, fleet
    # Besides the clients' Fleet calls, nginx saw only this test: the health calls over TLS, and the
    # plaintext attempt, whose HTTP/2 preface arrived where a TLS handshake belonged (400, never proxied;
    # gRPC may have reconnected once before the channel closed).
    others = [line for line in lines if "/fedgen.v1.Fleet/" not in line]
    health = [line for line in others if "POST /grpc.health.v1.Health/" in line]
    assert any('/Check HTTP/2.0" 200 ' in line and "grpc-status=0 " in line for line in health), health
    plaintext = [line for line in others if line not in health]
    assert plaintext and all('"PRI * HTTP/2.0" 400 ' in line for line in plaintext), others
    assert all(line.startswith("127.0.0.1 ") for line in lines)


def _client_logs(fed: LocalFederation) -> str:
    out = []
    for shard in fed.shards:
        log = fed.work_dir / f"{shard.stem}.log"
        if log.exists():
            out.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
    return "\n".join(out)
