"""Multifd channel framing: the init packet each channel starts with, and page packets.

A multifd channel carries only RAM pages. It starts with an init packet naming
the source and its channel id; then page packets follow, each one block's
normal pages (data, possibly compressed) and zero pages (offsets only), and at
the end of every pass a SYNC packet. Fields are documented in
docs/stream-format.md; every one is checked by ``read_packet``.
"""

from __future__ import annotations

import enum
import struct
import uuid as uuid_mod
from dataclasses import dataclass

import numpy as np

from mig_core.errors import MultifdError
from mig_core.ext.channel import Channel, ChannelEOF
from mig_core.stream.checksum import FLAG_CHECKSUMS, TRAILER, matches

#: first 8 bytes of a multifd channel (the main stream starts with ``MIGSTRM\0``)
MULTIFD_MAGIC = b"MIGMFD\x00\x00"
MULTIFD_VERSION = 1
#: magic, version u32, channel id u32, channels u32, flags u32, source uuid
INIT = struct.Struct("<8sIIII16s")
#: every page packet starts with this u32
PACKET_MAGIC = 0x4D464450  # "PDFM" on the wire
#: magic u32, flags u32, pass u32, block u16, pad, normal u32, zero u32, payload bytes u32, packet number u64
PACKET = struct.Struct("<IIIH2xIIIQ")
#: most pages one packet may carry (normal + zero)
MAX_PACKET_PAGES = 1 << 16
#: most payload bytes one packet may carry (compressed data can exceed the raw size a little)
MAX_PAYLOAD = (64 << 20) + (1 << 20)


class PacketFlag(enum.IntFlag):
    SYNC = 0x1  # end of pass ``pass``; no pages
    COMPRESSED = 0x2  # the payload went through the negotiated compressor
    FIN = 0x4  # the last packet of the channel


@dataclass(frozen=True)
class Packet:
    flags: PacketFlag
    pass_number: int
    block: int
    normal: np.ndarray  # page indices of the payload's pages, in payload order
    zero: np.ndarray  # page indices that are zero now
    payload_size: int
    number: int


def init_packet(channel_id: int, channels: int, source_uuid: str, flags: int = 0) -> bytes:
    """``flags``: FLAG_CHECKSUMS when every packet ends in checksums (x-checksums)."""
    return INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, channel_id, channels, flags, uuid_mod.UUID(source_uuid).bytes)


def pack_header(flags: int, pass_number: int, block: int, normal: int, zero: int, payload: int,
                number: int) -> bytes:
    return PACKET.pack(PACKET_MAGIC, flags, pass_number, block, normal, zero, payload, number)


def _recv(channel: Channel, n: int, what: str, cid: int) -> bytes:
    try:
        return channel.recv_exact(n)
    except ChannelEOF:
        raise MultifdError(f"multifd {cid}: unexpected EOF {what}") from None


def read_init(channel: Channel, magic: bytes, channels: int, seen: set[int]) -> tuple[int, str, int]:
    """Check the rest of an init packet whose first 8 bytes (``magic``) were already read.

    Returns the channel id, the source uuid it names (checked against the main stream's later) and its
    flags (FLAG_CHECKSUMS, checked against the main stream's header).
    """
    rest = _recv(channel, INIT.size - len(magic), "in the init packet", -1)
    _magic, version, cid, theirs, flags, raw_uuid = INIT.unpack(magic + rest)
    prefix = "failed to receive packet via multifd channel"
    if version != MULTIFD_VERSION:
        raise MultifdError(f"{prefix} {cid}: multifd: received packet version {version} expected "
                           f"{MULTIFD_VERSION}")
    uuid = str(uuid_mod.UUID(bytes=raw_uuid))
    if cid >= channels or theirs != channels:
        raise MultifdError(f"{prefix} {cid}: multifd: received channel id {cid} of {theirs} channels, "
                           f"but this host has multifd-channels {channels}")
    if cid in seen:
        raise MultifdError(f"{prefix} {cid}: multifd: received id '{cid}' already setup'")
    if flags & ~FLAG_CHECKSUMS:
        raise MultifdError(f"{prefix} {cid}: multifd: unknown init flags {flags:#x}")
    return cid, uuid, flags


def read_packet(channel: Channel, cid: int, nblocks: int, block_pages: list[int], compressed: bool,
                checksums: bool = False) -> Packet:
    """Read and check one packet header and its offsets (the payload is left on the channel).

    With ``checksums`` (x-checksums) the framing checksum that follows the offsets is checked too; the page
    checksums follow the payload (``read_page_hashes``).

    Runs once per packet on every channel thread, so it sticks to plain integers and one numpy pass
    per check (an enum operation or a numpy wrapper costs as much as the check itself here)."""
    head = _recv(channel, PACKET.size, "before a packet header", cid)
    magic, flags, pass_number, block, normal, zero, payload, number = PACKET.unpack(head)
    if magic != PACKET_MAGIC:
        raise MultifdError(f"multifd {cid}: received packet magic {magic:x}, expected {PACKET_MAGIC:x}")
    flag = _FLAGS.get(flags)
    if flag is None:
        raise MultifdError(f"multifd {cid}: unknown packet flags {flags:x}")
    if flags & _END:
        if normal or zero or payload:
            raise MultifdError(f"multifd {cid}: a {flag!r} packet carries pages")
        if checksums:
            _verify(channel, cid, [head])
        return Packet(flag, pass_number, 0, _NO_PAGES, _NO_PAGES, 0, number)
    if normal and flags & _COMPRESSED and not compressed:  # (a compressing source may send pages as they are)
        raise MultifdError(f"multifd {cid}: flags received {flags:x} flags expected 0")
    if normal + zero == 0 or normal + zero > MAX_PACKET_PAGES:
        raise MultifdError(f"multifd {cid}: received packet with {normal} non-zero and {zero} zero pages, "
                           f"expected 1 to {MAX_PACKET_PAGES} in all")
    if block >= nblocks:
        raise MultifdError(f"multifd {cid}: unknown ram block index {block} (the source listed {nblocks})")
    if payload > MAX_PAYLOAD or (normal == 0 and payload):
        raise MultifdError(f"multifd {cid}: packet payload of {payload} bytes for {normal} pages")
    offsets = np.empty(normal + zero, dtype="<u8")
    try:
        channel.recv_into(offsets)
    except ChannelEOF:
        raise MultifdError(f"multifd {cid}: unexpected EOF after packet header") from None
    if checksums:  # before the offsets are trusted: a flipped bit there must not place pages elsewhere
        _verify(channel, cid, [head, offsets])
    top = int(offsets.max())
    if top >= block_pages[block]:
        raise MultifdError(f"multifd {cid}: offset too long {top} (max {block_pages[block] - 1})")
    offsets = offsets.view(np.int64)  # below 2**63: checked above
    return Packet(flag, pass_number, block, offsets[:normal], offsets[normal:], payload, number)


def _verify(channel: Channel, cid: int, buffers: list[object]) -> None:
    if not matches(buffers, _recv(channel, TRAILER.size, "before a packet's checksum", cid)):
        raise MultifdError(f"multifd {cid}: a packet header failed its checksum: the stream was corrupted on "
                           "the way")


def read_page_hashes(channel: Channel, cid: int, count: int) -> np.ndarray:
    """The per-page checksums that follow a packet's payload (x-checksums)."""
    hashes = np.empty(count, dtype="<u8")
    try:
        channel.recv_into(hashes)
    except ChannelEOF:
        raise MultifdError(f"multifd {cid}: unexpected EOF inside a packet's page checksums") from None
    return hashes


_FLAGS = {int(f): f for f in (PacketFlag(v) for v in range(8))}
_END = int(PacketFlag.SYNC | PacketFlag.FIN)
_COMPRESSED = int(PacketFlag.COMPRESSED)
_NO_PAGES = np.empty(0, np.int64)
