"""What ``tls-creds``, ``tls-hostname`` and ``tls-authz`` mean for one migration (QEMU's rules).

``check`` refuses, before anything starts, what TLS cannot serve; ``source_transport`` and
``server_credentials`` find the named credentials or raise QMPError with QEMU's text (no such object,
not credentials, the wrong endpoint); ``destination_listener`` wraps the destination's listener.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mig_core.control.objects import ObjectRegistry
from mig_core.engine.tls import TlsListener, TlsTransport, address_hostname
from mig_core.errors import QMPError
from mig_core.ext.authz import AuthzCheck
from mig_core.ext.channel_security import ChannelSecurity
from mig_core.ext.transport import Listener, Transport
from mig_core.schema.migration import MigrationAddress, MigrationAddressType
from mig_core.schema.migration import MigrationCapability as C


def enabled(params: Mapping[str, Any]) -> bool:
    return bool(params["tls-creds"])


def check(params: Mapping[str, Any], caps: Mapping[Any, bool], addr: MigrationAddress) -> None:
    """Refuse a TLS migration whose transport or capabilities cannot carry a session."""
    if not enabled(params):
        return
    if addr.tag is MigrationAddressType.FILE:
        raise QMPError("TLS is not supported with the file transport: a file is no peer to hold a session with")
    if addr.tag is MigrationAddressType.RDMA:
        raise QMPError("TLS is not supported over rdma (QEMU's RDMA path would send in the clear)")


def source_transport(objects: ObjectRegistry, params: Mapping[str, Any], transport: Transport,
                     addr: MigrationAddress) -> tuple[Transport, str]:
    """``transport`` with every channel wrapped by the client credentials; also their id, to hold."""
    creds_id = str(params["tls-creds"])
    creds = objects.tls_creds(creds_id, "client")
    hostname = str(params["tls-hostname"]) or address_hostname(addr)
    return TlsTransport(transport, creds, hostname), creds_id


def server_credentials(objects: ObjectRegistry, params: Mapping[str, Any]) -> ChannelSecurity | None:
    """The destination's credentials if TLS is on (checked before it listens); QMPError with the reason."""
    if not enabled(params):
        return None
    creds = objects.tls_creds(str(params["tls-creds"]), "server")
    authz_id = str(params["tls-authz"])
    if authz_id and not creds.verify_peer:
        raise QMPError(f"tls-authz '{authz_id}' needs credentials that verify the peer: "
                       f"'{creds.creds_id}' has verify-peer=off, so no identity would be checked")
    return creds


def destination_listener(objects: ObjectRegistry, params: Mapping[str, Any], caps: Mapping[Any, bool],
                         creds: ChannelSecurity, listener: Listener) -> Listener:
    """``listener`` whose connections are admitted by a handshake with ``creds``; with postcopy-ram on when
    a connection arrives (``caps`` is read then) its session ends in the TLS relay, for the page server."""

    # tls-authz is read at each connection: an authz set later applies next time
    return TlsListener(listener, creds, lambda: _authz_now(objects, params, creds),
                       lambda: bool(caps.get(C.POSTCOPY_RAM)))


def _authz_now(objects: ObjectRegistry, params: Mapping[str, Any], creds: ChannelSecurity) -> AuthzCheck | None:
    """``tls-authz`` as it stands now (None: not set)."""
    authz_id = str(params["tls-authz"])
    return objects.authz_check(authz_id, creds.identity_kind) if authz_id else None


def recovery_tls(objects: ObjectRegistry, params: Mapping[str, Any], creds_id: str) -> dict[str, Any] | None:
    """What postcopy's page server needs to run migrate-recover's listener with the destination's TLS:
    the credentials' description and tls-authz as they stand now (None: no TLS)."""
    if not creds_id:
        return None
    creds = objects.tls_creds(creds_id, "server")
    check = _authz_now(objects, params, creds)
    return {"creds": creds.describe(), "authz": None if check is None else check.to_wire()}
