"""A migration's address: ``uri`` or ``channels`` resolved to a transport, and checked against the
capabilities (QEMU's order and texts, and what mig's machinery cannot serve yet)."""

from __future__ import annotations

from typing import Any

from mig_core.errors import QMPError
from mig_core.ext.transport import Transport, TransportRegistry
from mig_core.qapi import UNSET
from mig_core.schema.migration import MigrationAddress, MigrationAddressType
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.sockets import SocketAddress


def resolve(transports: TransportRegistry, uri: Any, channels: Any,
            incoming: bool) -> tuple[type[Transport], MigrationAddress]:
    """The transport class and the main channel's address of ``migrate``/``migrate-incoming``."""
    if (uri is UNSET) == (channels is UNSET):
        raise QMPError("need either 'uri' or 'channels' argument")
    if uri is not UNSET:
        return transports.parse(uri)
    if incoming and len(channels) != 1:
        raise QMPError("Channel list must have only one entry, for type 'main'")
    seen: set[str] = set()
    for ch in channels:
        if ch.channel_type.value in seen:
            raise QMPError(f"Channel list has more than one {ch.channel_type.value} entry")
        seen.add(ch.channel_type.value)
    main = [ch for ch in channels if ch.channel_type.value == "main"]
    if not main:
        raise QMPError("Channel list has no main entry")
    addr = main[0].addr
    return transports.for_address(addr), addr


def check_capabilities(caps: dict[C, bool], addr: MigrationAddress) -> None:
    """What the capabilities need of the address (QEMU's texts first), and what mig cannot do yet."""
    if caps[C.MAPPED_RAM] and addr.tag is not MigrationAddressType.FILE:
        raise QMPError("Migration requires seekable transport (e.g. file)")
    socket_kind = addr.value.tag.value if isinstance(addr.value, SocketAddress) else ""
    multi = (addr.tag is MigrationAddressType.SOCKET and socket_kind in ("inet", "unix", "vsock")
             # mig's extension: multifd over rdma (ZeroMQ), which QEMU refuses (docs/differences.md)
             or addr.tag is MigrationAddressType.RDMA)
    if (caps[C.MULTIFD] or caps[C.POSTCOPY_PREEMPT]) and not (
            multi or (addr.tag is MigrationAddressType.FILE and caps[C.MAPPED_RAM])):
        raise QMPError("Migration requires multi-channel URIs (e.g. tcp)")
    if caps[C.POSTCOPY_RAM] and not (addr.tag is MigrationAddressType.SOCKET and socket_kind in (
            "inet", "unix", "vsock", "fd")):
        # the page requests come back on the connection, and the destination's page server continues it
        raise QMPError(f"Postcopy needs a socket transport (tcp, unix, vsock or fd): the {addr.tag.value} "
                       "transport has no return path another process can continue")
    if caps[C.X_COLO]:
        # a checkpoint is one stream with the replies on its return path: no second connection, no
        # page server, no file; and its pages are plain (the secondary loads them into its cache)
        for other in (C.POSTCOPY_RAM, C.MULTIFD, C.MAPPED_RAM, C.X_CHECKSUMS):
            if caps[other]:
                raise QMPError(f"mig cannot combine {C.X_COLO.value} with {other.value} yet")
        if addr.tag is MigrationAddressType.FILE:
            raise QMPError("COLO needs a connection with a return path: the file transport has none")
    if caps[C.X_IGNORE_SHARED] and caps[C.MAPPED_RAM]:
        raise QMPError("mig cannot combine x-ignore-shared with mapped-ram yet")
