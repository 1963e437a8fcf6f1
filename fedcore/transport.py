"""gRPC settings both sides share: message limits, chunking, keepalive, auth metadata.

One place so the coordinator and the edge client can never disagree about limits.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import grpc

#: Largest single gRPC message either side accepts (a real limit, not gRPC's 2 GB-ish default).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Artifact and upload chunk size: small enough for a Pi's memory, large enough to amortise framing.
DEFAULT_CHUNK_BYTES = 64 * 1024
#: gRPC frames every message with a 1-byte compressed flag and a 4-byte length.
GRPC_MESSAGE_PREFIX_BYTES = 5
#: Metadata key carrying `Bearer <credential>` (client) or `Bearer <operator token>` (Control).
AUTH_METADATA_KEY = "authorization"


def wire_bytes(serialized_size: int) -> int:
    """Bytes one message occupies in the gRPC stream: payload plus the length prefix."""
    return serialized_size + GRPC_MESSAGE_PREFIX_BYTES


def bearer_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    return ((AUTH_METADATA_KEY, f"Bearer {secret}"),)


def bearer_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer secret in call metadata, or None when absent or malformed."""
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip() or None
    return None


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    """Options for client channels and servers alike.

    Keepalive pings every 30 s keep NAT and proxy mappings alive on mobile links; pings
    without calls are allowed because a long poll can be the only call in flight.
    """
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int | str]]:
    return [
        *channel_options(max_message_bytes),
        # Accept the clients' 30 s keepalive pings instead of answering GOAWAY(too_many_pings).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
        # The window a client may send on a stream before the server reads: a whole update of the
        # built-in model (107 KB) arrives without waiting for a window update from a busy server.
        ("grpc.http2.lookahead_bytes", 256 * 1024),
    ]


def _read_pem(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {what} {path}: {err.strerror}") from None


def client_tls_credentials(
    ca_file: str | Path | None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials for a channel: the CA that signed the server (None = system roots), and a
    client certificate and key for mutual TLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key and vice versa (--tls-cert with --tls-key)")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_file, "CA bundle"),
        private_key=_read_pem(key_file, "client key"),
        certificate_chain=_read_pem(cert_file, "client certificate"),
    )


def server_tls_credentials(
    cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path | None = None
) -> grpc.ServerCredentials:
    """TLS for the server; with `client_ca_file`, clients must present a certificate it signed."""
    cert = _read_pem(cert_file, "server certificate")
    key = _read_pem(key_file, "server key")
    client_ca = _read_pem(client_ca_file, "client CA bundle")
    assert cert is not None and key is not None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
