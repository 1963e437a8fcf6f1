"""A client's identity from its TLS certificate, under mutual TLS.

With `server.tls.client_id_from_certificate`, a client id is the common name of the certificate
the client presented in the handshake, which the configured CA signed: Join assigns that id (a
request for another is refused), and every later call must come over a connection certified for
the id its credential names. A stolen credential is then useless without the device's private
key, and a device that lost its credential (reflashed, cache wiped) joins again with its
certificate alone. It needs TLS to end at the coordinator: behind a TLS-terminating proxy the
coordinator sees no certificate and refuses every call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from fedgen.coordinator import errors

_COMMON_NAME = "x509_common_name"


def certified_client_id(auth_context: Mapping[str, Iterable[bytes]]) -> str:
    """The client id the connection's certificate names (gRPC's auth context of the call)."""
    names = [name.decode("utf-8", "replace") for name in auth_context.get(_COMMON_NAME, ())]
    if len(names) != 1 or not names[0]:
        raise errors.Unauthenticated(
            "this coordinator takes client ids from client certificates (server.tls.client_id_from_certificate): "
            "connect with mutual TLS and a certificate whose common name is the client id"
        )
    return names[0]


def check_certified(auth_context: Mapping[str, Iterable[bytes]], client_id: str) -> None:
    """Raises PermissionDenied unless the connection's certificate is `client_id`'s."""
    certified = certified_client_id(auth_context)
    if certified != client_id:
        raise errors.PermissionDenied(
            f"the credential of {client_id!r} was presented on a connection certified as {certified!r}"
        )
