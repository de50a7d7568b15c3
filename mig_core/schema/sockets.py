"""SocketAddress and friends (QEMU's sockets.json), as used by migration addresses."""

from __future__ import annotations

from mig_core.qapi import UNSET, Bool, FlatUnion, QapiEnum, QapiStruct, Str, UInt16, UInt32, UnsetType


class SocketAddressType(QapiEnum):
    INET = "inet"
    UNIX = "unix"
    VSOCK = "vsock"
    FD = "fd"


class InetSocketAddress(QapiStruct):
    """A host and a port (a string: a number or a service name), plus connection options."""

    host: Str
    port: Str
    numeric: Bool | UnsetType = UNSET
    to: UInt16 | UnsetType = UNSET
    ipv4: Bool | UnsetType = UNSET
    ipv6: Bool | UnsetType = UNSET
    keep_alive: Bool | UnsetType = UNSET
    keep_alive_count: UInt32 | UnsetType = UNSET
    keep_alive_idle: UInt32 | UnsetType = UNSET
    keep_alive_interval: UInt32 | UnsetType = UNSET
    mptcp: Bool | UnsetType = UNSET


class UnixSocketAddress(QapiStruct):
    path: Str
    abstract: Bool | UnsetType = UNSET
    tight: Bool | UnsetType = UNSET


class VsockSocketAddress(QapiStruct):
    cid: Str
    port: Str


class String(QapiStruct):
    """A single string; the ``fd`` branch names a monitor file descriptor or a number."""

    str: Str


class SocketAddress(FlatUnion):
    """A socket address of any family, flat on the ``type`` discriminator."""

    discriminator = "type"
    tag_type = SocketAddressType
    branches = {
        "inet": InetSocketAddress,
        "unix": UnixSocketAddress,
        "vsock": VsockSocketAddress,
        "fd": String,
    }
