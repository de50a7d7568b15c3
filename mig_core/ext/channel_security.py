"""The channel-security extension point (``mig_core.channel_security``): TLS over any channel.

A ``tls-creds`` object names credentials; the migration asks the security
provider serving their kind to wrap each channel it opens (main, multifd,
return path share one session per connection) before the stream starts. A
handshake failure, an unknown peer or a hostname mismatch raises
``ChannelError`` with the reason, and the migration fails with that text.
Wrapping runs on the thread that opened the channel, before any migration
data moves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

from mig_core.ext.channel import Channel
from mig_core.plugin.registry import PluginRegistry

#: The entry-point group of channel-security providers (key: the credential kind, e.g. ``tls-creds-x509``).
GROUP = "mig_core.channel_security"


class ChannelSecurity(ABC):
    """Wraps channels with one set of credentials. Plugins subclass this."""

    #: The name in the ``mig_core.channel_security`` group (the QOM type of the credentials it serves).
    name: ClassVar[str]

    def __init__(self, creds_id: str, properties: Mapping[str, object]) -> None:
        """``properties`` are the credentials object's (``dir``, ``endpoint``, ``verify-peer`` …); a bad one
        raises ``ValueError`` naming it."""
        self.creds_id = creds_id
        self.properties = dict(properties)

    @abstractmethod
    def wrap_client(self, channel: Channel, hostname: str | None) -> Channel:
        """The source's end: a channel that speaks TLS to the server, checking ``hostname`` (tls-hostname)."""

    @abstractmethod
    def wrap_server(self, channel: Channel, authz: str | None) -> Channel:
        """The destination's end: a channel that speaks TLS to the client, authorised by ``authz`` (tls-authz)."""


def load(registry: PluginRegistry, name: str) -> type[ChannelSecurity]:
    """The provider class serving credentials of kind ``name``; logs its class and distribution.
    ``PluginNotFound`` naming the group and the name if none does."""
    return registry.load_class(GROUP, name, ChannelSecurity)
