"""The channel-security extension point (``mig_core.channel_security``): TLS over any channel.

A credentials object (``object-add qom-type=tls-creds-x509``…) is an instance of the provider
registered under its QOM type; it loads and checks its files when it is created, so bad credentials
are refused at ``object-add``. A migration with ``tls-creds`` asks it to wrap each channel it opens
(main, every multifd channel; the return path shares the main channel's session) before any
migration data moves. A handshake failure, a peer refused by ``tls-authz`` or a hostname mismatch
raises ``ChannelError`` with the reason, and the migration fails with that text.
"""

from __future__ import annotations

import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from mig_core.ext.channel import Channel
from mig_core.plugin.registry import PluginRegistry

#: The entry-point group of channel-security providers (key: the credential kind, e.g. ``tls-creds-x509``).
GROUP = "mig_core.channel_security"

#: Called by a server with the peer's identity (an x509 distinguished name, a PSK username); raises
#: ``ChannelError`` with the reason when the identity may not connect.
Authorize = Callable[[str], None]


class ChannelSecurity(ABC):
    """Wraps channels with one set of credentials. Plugins subclass this."""

    #: The name in the ``mig_core.channel_security`` group (the QOM type of the credentials it serves).
    name: ClassVar[str]
    #: What a peer's identity is, as ``tls-authz`` refusals name it (QEMU: ``x509`` or ``PSK``).
    identity_kind: ClassVar[str] = "x509"

    def __init__(self, creds_id: str, properties: Mapping[str, object]) -> None:
        """``properties`` are the object's (``dir``, ``endpoint``, ``verify-peer`` …), names as on the wire;
        bad or unloadable credentials raise ``ValueError`` with the text ``object-add`` answers."""
        self.creds_id = creds_id
        self.properties = dict(properties)

    def describe(self) -> dict[str, Any]:
        """What another process needs to load the same credentials (``from_description``): a TLS relay,
        a monitor front, a postcopy page server."""
        return {"qom-type": self.name, "id": self.creds_id, "properties": self.properties}

    @property
    def endpoint(self) -> str:
        """``client`` (the source's credentials) or ``server`` (the destination's)."""
        return str(self.properties.get("endpoint", "client"))

    @property
    def verify_peer(self) -> bool:
        """Whether the peer must prove its identity (a certificate the CA signed)."""
        return bool(self.properties.get("verify-peer", True))

    @abstractmethod
    def wrap_client(self, channel: Channel, hostname: str | None) -> Channel:
        """The source's end: a channel that speaks TLS to the server, checking ``hostname`` (tls-hostname)."""

    @abstractmethod
    def wrap_server(self, channel: Channel, authorize: Authorize | None) -> Channel:
        """The destination's end: a channel that speaks TLS to the client, its identity passed to
        ``authorize`` (tls-authz) when the credentials verify peers."""

    def stream_context(self) -> ssl.SSLContext:
        """An ``ssl`` context for plain TLS streams that are not migration channels (a tcp QMP monitor,
        ``tls-creds=`` on ``--qmp``). Credentials that cannot give one raise ``ValueError`` saying so."""
        raise ValueError(f"credentials of type '{self.name}' cannot secure a QMP monitor")

    def peer_identity(self, certificate: bytes) -> str:
        """The identity ``tls-authz`` rules match in a peer's certificate (DER): an x509 distinguished name."""
        raise ValueError(f"credentials of type '{self.name}' have no peer identity")


def load(registry: PluginRegistry, name: str) -> type[ChannelSecurity]:
    """The provider class serving credentials of kind ``name``; logs its class and distribution.
    ``PluginNotFound`` naming the group and the name if none does."""
    return registry.load_class(GROUP, name, ChannelSecurity)


def from_description(registry: PluginRegistry, description: Mapping[str, Any]) -> ChannelSecurity:
    """The credentials ``ChannelSecurity.describe`` gave, loaded again in this process (``ValueError`` with
    the reason if they no longer load, e.g. a file removed since)."""
    cls = load(registry, str(description["qom-type"]))
    return cls(str(description["id"]), description["properties"])
