"""``tls-creds-x509``: certificates in a directory laid out as QEMU's (``ca-cert.pem``, ``server-cert.pem``…).

Loading follows QEMU: which files each endpoint needs, the sanity check of our own certificates
(validity period, basic constraints, issued by the CA) with QEMU's texts, so a bad directory is refused
at ``object-add`` rather than at the first migration. Sessions are TLS 1.3 only.
"""

from __future__ import annotations

import datetime
import errno
import os
import ssl
from collections.abc import Callable, Mapping

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from mig_core.errors import ChannelError
from mig_core.ext.channel import Channel
from mig_core.ext.channel_security import Authorize, ChannelSecurity
from mig_tls.session import client_session, server_session

log = structlog.get_logger("mig.tls")

CA_CERT, CA_CRL = "ca-cert.pem", "ca-crl.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT_CERT, CLIENT_KEY = "client-cert.pem", "client-key.pem"

#: OpenSSL's verification codes, in QEMU's words (crypto/tlssession.c)
_VERIFY_TEXT = {
    9: "The certificate is not yet activated",
    10: "The certificate has expired",
    2: "The certificate hasn't got a known issuer",
    18: "The certificate hasn't got a known issuer",
    19: "The certificate hasn't got a known issuer",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    23: "The certificate has been revoked",
}
_HOSTNAME_MISMATCH = {62, 64}


def credential_path(directory: str | None, name: str, required: bool) -> str | None:
    """``dir/name`` if it exists; QEMU's texts when a required one is missing (None if optional)."""
    if directory is None:
        if required:
            raise ValueError("Missing 'dir' property value")
        return None
    path = f"{directory}/{name}"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOENT and not required:
            return None
        raise ValueError(f"Unable to access credentials {path}: {e.strerror}") from None
    return path


def _load_pem_list(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificates(f.read())
    except OSError as e:
        raise ValueError(f"Cannot load CA cert list {path}: {e.strerror}") from None
    except ValueError:
        raise ValueError(f"Unable to import CA certificate list {path}") from None


def sanity_check(server: bool, ca_path: str, cert_path: str | None) -> None:
    """QEMU's checks of our own certificate and the CA before any session uses them."""
    role = "server" if server else "client"
    now = datetime.datetime.now(datetime.UTC)
    cert = None
    if cert_path is not None and os.access(cert_path, os.R_OK):
        try:
            certs = _load_pem_list(cert_path)
        except ValueError:
            raise ValueError(f"Unable to import {role} certificate {cert_path}") from None
        cert = certs[0] if certs else None
    cas = _load_pem_list(ca_path) if os.access(ca_path, os.R_OK) else []
    for c, path, is_ca in [(cert, cert_path, False)] + [(ca, ca_path, True) for ca in cas]:
        if c is None:
            continue
        what = "CA" if is_ca else role
        if c.not_valid_after_utc < now:
            raise ValueError(f"The {what} certificate {path} has expired")
        if c.not_valid_before_utc > now:
            raise ValueError(f"The {what} certificate {path} is not yet active")
        try:
            shows_ca: bool | None = c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            shows_ca = None
        if is_ca and shows_ca is None:
            raise ValueError(f"The certificate {path} is missing basic constraints for a CA")
        if is_ca and shows_ca is False:
            raise ValueError(f"The certificate {path} basic constraints do not show a CA")
        if not is_ca and shows_ca:
            raise ValueError(f"The certificate {path} basic constraints show a CA, but we need one for a {role}")
    if cert is not None and cas:
        for ca in cas:
            try:
                cert.verify_directly_issued_by(ca)
                return
            except (ValueError, TypeError, InvalidSignature):
                continue
        raise ValueError(f"Our own certificate {cert_path} failed validation against {ca_path}: "
                         "The certificate hasn't got a known issuer")


def distinguished_name(der: bytes) -> str:
    """The subject of a certificate as RFC 4514 writes it (``CN=host,O=Org,C=GB``), what authz rules match."""
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


def describe_failure(e: ssl.SSLError, hostname: str | None) -> str:
    """An OpenSSL handshake failure in QEMU's words where QEMU has them."""
    if isinstance(e, ssl.SSLCertVerificationError):
        if e.verify_code in _HOSTNAME_MISMATCH:
            return f"Certificate does not match the hostname {hostname}"
        return _VERIFY_TEXT.get(e.verify_code, f"The certificate is not trusted ({e.verify_message})")
    reason = (e.reason or str(e)).lower().replace("_", " ")
    if "alert" in reason:
        return f"TLS handshake failed: the peer refused the session ({reason})"
    return f"TLS handshake failed: {reason}"


class X509Credentials(ChannelSecurity):
    """x509 credentials for one endpoint; the SSL context is built once, at ``object-add``."""

    name = "tls-creds-x509"

    def __init__(self, creds_id: str, properties: Mapping[str, object]) -> None:
        super().__init__(creds_id, properties)
        if self.properties.get("priority"):
            raise ValueError("Property 'priority' is not supported: mig's sessions are OpenSSL's TLS 1.3, "
                             "which a GnuTLS priority string does not describe")
        if self.properties.get("passwordid"):
            raise ValueError("Property 'passwordid' is not supported: mig has no 'secret' objects "
                             "(use an unencrypted key file readable only by this user)")
        d = self.properties.get("dir")
        directory = None if d is None else str(d)
        server = self.endpoint == "server"
        ca = credential_path(directory, CA_CERT, True)
        assert ca is not None
        if server:
            crl = credential_path(directory, CA_CRL, False)
            cert = credential_path(directory, SERVER_CERT, True)
            key = credential_path(directory, SERVER_KEY, True)
        else:
            crl = None
            cert = credential_path(directory, CLIENT_CERT, False)
            key = credential_path(directory, CLIENT_KEY, False)
        if self.properties.get("sanity-check", True):
            sanity_check(server, ca, cert)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_verify_locations(cafile=ca)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"Cannot load CA certificate '{ca}': {getattr(e, 'reason', None) or e}") from None
        if cert is not None and key is not None:
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"Cannot load certificate '{cert}' & key '{key}': "
                                 f"{getattr(e, 'reason', None) or e}") from None
        if crl is not None:
            try:
                ctx.load_verify_locations(cafile=crl)
            except (ssl.SSLError, OSError) as e:
                raise ValueError(f"Cannot load CRL '{crl}': {getattr(e, 'reason', None) or e}") from None
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if server:
            ctx.num_tickets = 0  # no resumption: nothing for the client to read after the handshake
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        else:
            ctx.check_hostname = self.verify_peer
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        self.context = ctx
        log.info("tls_creds_loaded", id=creds_id, endpoint=self.endpoint, verify_peer=self.verify_peer,
                 dir=directory, client_cert=cert is not None)

    def stream_context(self) -> ssl.SSLContext:
        return self.context

    def peer_identity(self, certificate: bytes) -> str:
        return distinguished_name(certificate)

    def wrap_client(self, channel: Channel, hostname: str | None) -> Channel:
        if self.verify_peer and not hostname:
            raise ChannelError("No hostname for certificate validation")
        return client_session(channel, self.context, hostname if self.verify_peer else None,
                              lambda e: describe_failure(e, hostname))

    def wrap_server(self, channel: Channel, authorize: Authorize | None) -> Channel:
        check: Callable[[bytes | None], None] | None = None
        if self.verify_peer and authorize is not None:
            def check(der: bytes | None) -> None:
                if der is None:
                    raise ChannelError("The peer did not send a certificate")
                authorize(distinguished_name(der))
        return server_session(channel, self.context, lambda e: describe_failure(e, None), check)
