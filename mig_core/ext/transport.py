"""The transport extension point (``mig_core.transports``): addresses in, channels out.

A transport plugin serves one ``MigrationAddressType`` (its entry-point name)
and declares the URI schemes it parses. The core turns a ``uri`` or a
``channels`` entry into a ``MigrationAddress`` through the plugin that claims
the scheme, then asks the same plugin to connect (source) or listen
(destination). A transport never looks inside the stream.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from mig_core.errors import QMPError
from mig_core.ext.channel import Channel, ChannelAbilities, ChannelAborted
from mig_core.plugin.registry import PluginNotFound, PluginRegistry
from mig_core.schema.migration import MigrationAddress
from mig_core.schema.sockets import SocketAddress

GROUP = "mig_core.transports"


def partition_host_port(addr: str, shown: str | None = None) -> tuple[str, str]:
    """``HOST:PORT`` or ``[V6]:PORT`` split as QEMU's inet_parse does (the port unchecked).

    ValueError with QEMU's text otherwise, quoting ``shown`` (the whole address as given) or ``addr``.
    """
    shown = addr if shown is None else shown
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"error parsing IPv6 address '{shown}'")
    else:
        host, sep, port = addr.rpartition(":")
        if not sep:
            raise ValueError(f"error parsing address '{shown}'")
    return host, port


def split_host_port(rest: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` with a numeric port (QEMU's inet_parse errors); ValueError if bad."""
    host, port = partition_host_port(rest)
    if not port.isdigit() or int(port) > 65535:
        raise ValueError(f"error parsing address '{rest}'")
    return host, int(port)


class TransportError(QMPError):
    """An address that cannot be parsed or used, or a connection that failed; QEMU's wording."""


@dataclass
class TransportContext:
    """What transports may need from the host: named descriptors (``getfd``) and connection options."""

    named_fds: dict[str, int] = field(default_factory=dict)
    #: Take a named descriptor for good (it is removed from the table), as QEMU's fd: migration does.
    take_fd: Callable[[str], int | None] | None = None
    keepalive: bool = True
    #: Seconds of unacknowledged data after which a connection counts as dead (TCP_USER_TIMEOUT).
    user_timeout: float = 30.0
    #: On a loopback TCP connection, replace a pacing congestion control (BBR) with one that does not
    #: pace (cubic, else reno): pacing protects a shared bottleneck, and loopback has none, only the
    #: cost of the pacing timers (one raw loopback stream here: 0.21 s per GiB with BBR, 0.15 s with cubic).
    unpaced_loopback: bool = True


class Listener(ABC):
    """A destination waiting for the source's connection(s)."""

    @property
    def socket_addresses(self) -> list[SocketAddress]:
        """The bound addresses, for ``query-migrate``'s ``socket-address`` (empty if not a socket)."""
        return []

    @abstractmethod
    def accept(self) -> Channel:
        """Wait for the next connection; raises ChannelAborted once ``close()`` was called."""

    @abstractmethod
    def close(self) -> None:
        """Stop listening; a blocked ``accept`` returns with an error at once."""

    def open_extra(self, direct_io: bool) -> Channel:
        """Another channel reading the same source (files: one descriptor per loading thread)."""
        raise TransportError("Migration requires a transport that allows for extra fds (e.g. file)")


class SingleChannelListener(Listener):
    """A "listener" whose stream already exists (an fd, a file, a child's pipe): accept() hands it out once.

    ``extra`` opens more channels on the same source (a file's further descriptors for parallel reads).
    """

    def __init__(self, channel: Channel, what: str, extra: Callable[[bool], Channel] | None = None) -> None:
        self._channel: Channel | None = channel
        self._what = what
        self._extra = extra

    def open_extra(self, direct_io: bool) -> Channel:
        if self._extra is None:
            return super().open_extra(direct_io)
        return self._extra(direct_io)

    def accept(self) -> Channel:
        if self._channel is None:
            raise ChannelAborted(f"the incoming {self._what} was already used")
        ch, self._channel = self._channel, None
        return ch

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None


class Transport(ABC):
    """One migration address type. Plugins subclass this; entry-point name = the address type."""

    #: The MigrationAddressType value served.
    address_type: ClassVar[str]
    #: URI schemes parsed (``tcp``, ``unix`` ...), without the colon.
    uri_schemes: ClassVar[tuple[str, ...]]
    abilities: ClassVar[ChannelAbilities] = ChannelAbilities()
    #: True if connect() does not wait on a peer (a file, a child process): ``migrate`` then connects
    #: at once and reports a failure synchronously, as QEMU does for these transports.
    connects_synchronously: ClassVar[bool] = False

    def __init__(self, ctx: TransportContext) -> None:
        self.ctx = ctx

    @classmethod
    @abstractmethod
    def parse_uri(cls, uri: str) -> MigrationAddress:
        """Turn a URI of one of ``uri_schemes`` into an address; TransportError with QEMU's text if bad."""

    def check_address(self, addr: MigrationAddress, incoming: bool) -> None:
        """Refuse an address this transport cannot use (before any state changes)."""

    @abstractmethod
    def connect(self, addr: MigrationAddress, abort_check: Callable[[], bool]) -> Channel:
        """Open the outgoing channel (in the migration thread); give up when ``abort_check()`` turns true."""

    def connect_extra(self, addr: MigrationAddress, abort_check: Callable[[], bool], direct_io: bool) -> Channel:
        """A further outgoing channel (multifd): another connection, or another descriptor on the same file."""
        if direct_io:
            raise TransportError("Migration requires a transport that allows for extra fds (e.g. file)")
        return self.connect(addr, abort_check)

    @abstractmethod
    def listen(self, addr: MigrationAddress) -> Listener:
        """Start listening for an incoming migration (synchronously: errors reach the QMP caller)."""


class TransportRegistry:
    """Finds the transport plugin for a URI scheme or an address type."""

    def __init__(self, registry: PluginRegistry) -> None:
        self.registry = registry

    def classes(self) -> dict[str, type[Transport]]:
        return self.registry.load_all(GROUP)

    def for_uri(self, uri: str) -> type[Transport]:
        scheme = uri.split(":", 1)[0] if ":" in uri else ""
        for cls in self.classes().values():
            if scheme in cls.uri_schemes:
                return cls
        raise TransportError(f"unknown migration protocol: {uri}")

    def for_address(self, addr: MigrationAddress) -> type[Transport]:
        name = addr.tag.value
        try:
            return load(self.registry, name)
        except PluginNotFound as e:
            raise TransportError(f"migration transport '{name}' is not available: {e}") from None

    def parse(self, uri: str) -> tuple[type[Transport], MigrationAddress]:
        cls = self.for_uri(uri)
        return cls, cls.parse_uri(uri)


def load(registry: PluginRegistry, name: str) -> type[Transport]:
    """The transport class serving address type ``name``; logs its class and distribution.
    ``PluginNotFound`` naming the group and the name if none does."""
    return registry.load_class(GROUP, name, Transport)
