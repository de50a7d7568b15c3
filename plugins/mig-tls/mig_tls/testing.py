"""Test certificates: a CA and server/client certificates in QEMU's directory layout, made on the spot.

``make_pki(dir)`` writes a complete directory for both endpoints; keyword arguments make the faults
tests need (a client certificate with another name, an expired server certificate, a foreign CA).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _name(cn: str, org: str = "mig tests") -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "GB"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class Authority:
    """A CA that signs certificates for tests."""

    def __init__(self, cn: str = "mig test CA") -> None:
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self.name = _name(cn)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - _DAY).not_valid_after(now + 30 * _DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False,
                                                  key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, cn: str, server: bool, hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
              expired: bool = False) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for ``cn``; a server's names ``hosts`` in its subjectAltName."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 30 * _DAY, now - _DAY) if expired else (now - _DAY, now + 30 * _DAY)
        b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            alt: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    alt.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path, ca: Authority | None = None, client_cn: str = "source.mig.test",
             server_hosts: tuple[str, ...] = ("localhost", "127.0.0.1"), server_expired: bool = False,
             client_expired: bool = False, trust: Authority | None = None) -> Authority:
    """Write ``ca-cert.pem``, server and client certificates and keys into ``directory``.

    ``ca`` signs them (a new CA if None); ``trust`` is the CA written as ``ca-cert.pem`` (default ``ca``:
    another one makes a directory that trusts a foreign CA).
    """
    ca = ca or Authority()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca-cert.pem").write_bytes((trust or ca).pem)
    for role, cn, server, expired in (("server", "destination.mig.test", True, server_expired),
                                      ("client", client_cn, False, client_expired)):
        cert, key = ca.issue(cn, server, server_hosts, expired)
        (directory / f"{role}-cert.pem").write_bytes(cert)
        (directory / f"{role}-key.pem").write_bytes(key)
        (directory / f"{role}-key.pem").chmod(0o600)
    return ca
