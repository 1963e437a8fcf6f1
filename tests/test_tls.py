"""TLS and mutual TLS on the coordinator's own port, with certificates made by the test."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from certs import SERVER_NAME, Pki, issue_client_cert, make_pki

from fedgen.coordinator.config import ConfigError, parse_config
from fedgen.coordinator.local import LocalFederation, write_shards
from fedgen.core.data import load_idx_dataset
from fedgen.core.transport import bearer_metadata, channel_options, client_tls_credentials
from fedgen.v1 import control_pb2, fleet_pb2, fleet_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "tls-test-enrollment-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _config(  # type: ignore[no-untyped-def]
    tmp_path: Path, pki: Pki, mnist_dir: Path, mutual: bool, rounds: int = 2, clients: int = 2, certified: bool = False
):
    tls: dict[str, object] = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    if mutual:
        tls["client_ca_file"] = str(pki.ca_cert)
    if certified:
        tls["client_id_from_certificate"] = True
    return parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "server": {"address": "127.0.0.1:0", "tls": tls},
            "federation": {
                "strategy": "fedavg",
                "rounds": rounds,
                "clients_per_round": clients,
                "min_clients": clients,
                "min_completed": clients,
                "round_timeout_s": 120,
                "seed": 1,
            },
            "training": {"local_steps": 10, "learning_rate": 0.05},
            "data": {"test_data_dir": str(mnist_dir)},
            "auth": {"enrollment_tokens": [TOKEN]},
        }
    )


def _channel(address: str, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    return grpc.secure_channel(
        address, credentials, [*channel_options(), ("grpc.ssl_target_name_override", SERVER_NAME)]
    )


def _join(address: str, credentials: grpc.ChannelCredentials | None, leave: bool = False) -> fleet_pb2.JoinResponse:
    """Joins (and with `leave`, leaves again at once, so the round engine never samples this
    client that will not train)."""
    options = channel_options()
    if credentials is None:
        channel = grpc.insecure_channel(address, options)
    else:
        channel = grpc.secure_channel(address, credentials, [*options, ("grpc.ssl_target_name_override", SERVER_NAME)])
    with channel:
        stub = fleet_pb2_grpc.FleetStub(channel)
        reply = stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN), timeout=10)
        if leave:
            stub.Leave(fleet_pb2.LeaveRequest(reason="test"), timeout=10, metadata=bearer_metadata(reply.credential))
        return reply


def test_tls_federation_with_real_clients(pki: Pki, mnist_dir: Path, tmp_path: Path) -> None:
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, tmp_path / "shards", n_clients=2, alpha=1.0, seed=3, samples_per_class=100)
    config = _config(tmp_path, pki, mnist_dir, mutual=False)
    with LocalFederation(
        config,
        shards,
        tmp_path,
        extra_client_args=["--tls-ca", str(pki.ca_cert), "--tls-server-name", SERVER_NAME],
        control_credentials=client_tls_credentials(pki.ca_cert),
        control_server_name=SERVER_NAME,
    ) as fed:
        fed.start_coordinator()
        # Plaintext to a TLS port fails; TLS with the right CA works.
        with pytest.raises(grpc.RpcError) as err:
            _join(fed.address, None)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        joined = _join(fed.address, client_tls_credentials(pki.ca_cert), leave=True)
        assert joined.client_id
        fed.start_clients(TOKEN)
        events = list(fed.events(timeout_s=300))
        assert events[-1].kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
        assert fed.wait_clients(timeout_s=120) == [0, 0]
        rows = fed.ledger()
    assert [r.round for r in rows] == [0, 1] and all(r.completed == 2 for r in rows)


def test_mutual_tls_admits_only_certificates_from_the_configured_ca(pki: Pki, mnist_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, pki, mnist_dir, mutual=True)
    with LocalFederation(config, [], tmp_path) as fed:
        fed.start_coordinator()
        ok = _join(fed.address, client_tls_credentials(pki.ca_cert, pki.client_cert, pki.client_key))
        assert ok.client_id and ok.credential
        for creds in (
            client_tls_credentials(pki.ca_cert),  # no client certificate
            client_tls_credentials(pki.ca_cert, pki.rogue_client_cert, pki.rogue_client_key),
        ):
            with pytest.raises(grpc.RpcError) as err:
                _join(fed.address, creds)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake is refused


def test_client_ids_from_certificates_bind_each_credential_to_its_device(
    pki: Pki, mnist_dir: Path, tmp_path: Path
) -> None:
    """Under `client_id_from_certificate` the certificate names the id: Join cannot ask for another,
    a device that lost its credential rejoins on its certificate alone, and a credential is refused
    on any other device's connection. Two real edge clients with their own certificates train."""
    train = load_idx_dataset(mnist_dir, "train")
    shards, _ = write_shards(train, tmp_path / "shards", n_clients=2, alpha=1.0, seed=3, samples_per_class=100)
    devices = [issue_client_cert(pki, shard.stem, tmp_path / "devices") for shard in shards]
    config = _config(tmp_path, pki, mnist_dir, mutual=True, certified=True)
    operator_creds = client_tls_credentials(pki.ca_cert, pki.client_cert, pki.client_key)
    with LocalFederation(
        config,
        shards,
        tmp_path,
        extra_client_args=["--tls-ca", str(pki.ca_cert), "--tls-server-name", SERVER_NAME],
        per_client_args={k: ["--tls-cert", str(cert), "--tls-key", str(key)] for k, (cert, key) in enumerate(devices)},
        control_credentials=operator_creds,
        control_server_name=SERVER_NAME,
    ) as fed:
        fed.start_coordinator()
        other_device = client_tls_credentials(pki.ca_cert, *devices[0])
        with _channel(fed.address, operator_creds) as mine, _channel(fed.address, other_device) as theirs:
            stub, their_stub = fleet_pb2_grpc.FleetStub(mine), fleet_pb2_grpc.FleetStub(theirs)
            first = stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN), timeout=10)
            assert first.client_id == "edge-device-01"  # the certificate's common name
            with pytest.raises(grpc.RpcError) as err:
                stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN, requested_client_id=shards[0].stem), timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "'client-00' is not the id this connection's certificate names ('edge-device-01')" in (
                err.value.details() or ""
            )
            # Lost its credential: the certificate alone proves the id; the old credential is void.
            again = stub.Join(fleet_pb2.JoinRequest(enrollment_token=TOKEN), timeout=10)
            assert again.client_id == "edge-device-01" and again.credential != first.credential
            with pytest.raises(grpc.RpcError) as err:
                stub.Heartbeat(fleet_pb2.HeartbeatRequest(), timeout=10, metadata=bearer_metadata(first.credential))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # A stolen credential on another device's connection.
            with pytest.raises(grpc.RpcError) as err:
                their_stub.Heartbeat(
                    fleet_pb2.HeartbeatRequest(), timeout=10, metadata=bearer_metadata(again.credential)
                )
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "certified as 'client-00'" in (err.value.details() or "")
            stub.Leave(fleet_pb2.LeaveRequest(reason="test"), timeout=10, metadata=bearer_metadata(again.credential))
        fed.start_clients(TOKEN)
        events = list(fed.events(timeout_s=300))
        assert events[-1].kind == control_pb2.RoundEvent.KIND_FEDERATION_FINISHED
        assert fed.wait_clients(timeout_s=120) == [0, 0]
        rows = fed.ledger()
    assert [r.round for r in rows] == [0, 1] and all(r.completed == 2 for r in rows)


def test_tls_config_errors_name_the_key(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server.tls: .*cert_file and key_file must be given together"):
        parse_config({"server": {"tls": {"cert_file": str(pki.server_cert)}}})
    with pytest.raises(ConfigError, match=r"key_file .* is not a readable file"):
        parse_config({"server": {"tls": {"cert_file": str(pki.server_cert), "key_file": str(tmp_path / "nope.key")}}})
    with pytest.raises(ConfigError, match="client_id_from_certificate needs mutual TLS"):
        parse_config({"server": {"tls": {"client_id_from_certificate": True}}})
    with pytest.raises(ConfigError, match="client_ca_file \\(mutual TLS\\) needs cert_file"):
        parse_config({"server": {"tls": {"client_ca_file": str(pki.ca_cert)}}})
