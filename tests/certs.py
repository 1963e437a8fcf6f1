"""Test certificates made on the fly with `cryptography`: a CA, a server and a client certificate.

Nothing here is committed key material: every test run makes fresh keys in its temp dir.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: The name the server certificate is issued to (besides localhost / 127.0.0.1 / ::1).
SERVER_NAME = "coordinator.fedgen.test"


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A second CA and a client certificate it signed: what a stranger would present.
    rogue_client_cert: Path
    rogue_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    cn: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName(SERVER_NAME),
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(out: Path) -> Pki:
    """A CA, a server certificate for localhost/127.0.0.1/SERVER_NAME, a client certificate, and a
    client certificate from an unrelated CA; all PEM files under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("fedgen test CA")
    server, server_key = _leaf(SERVER_NAME, ca, ca_key, server=True)
    client, client_key = _leaf("edge-device-01", ca, ca_key, server=False)
    rogue_ca, rogue_key = _ca("someone else's CA")
    rogue, rogue_client_key = _leaf("stranger", rogue_ca, rogue_key, server=False)
    return Pki(
        ca_cert=_write_cert(ca, out / "ca.pem"),
        ca_key=_write_key(ca_key, out / "ca.key"),
        server_cert=_write_cert(server, out / "server.pem"),
        server_key=_write_key(server_key, out / "server.key"),
        client_cert=_write_cert(client, out / "client.pem"),
        client_key=_write_key(client_key, out / "client.key"),
        rogue_client_cert=_write_cert(rogue, out / "rogue-client.pem"),
        rogue_client_key=_write_key(rogue_client_key, out / "rogue-client.key"),
    )


def issue_client_cert(pki: Pki, common_name: str, out: Path) -> tuple[Path, Path]:
    """A client certificate for `common_name` from the Pki's CA: (certificate, key) PEM paths."""
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    cert, key = _leaf(common_name, ca, ca_key, server=False)
    out.mkdir(parents=True, exist_ok=True)
    return _write_cert(cert, out / f"{common_name}.pem"), _write_key(key, out / f"{common_name}.key")
