"""Constants and fixed layouts of the wire format (documented in docs/stream-format.md)."""

from __future__ import annotations

import enum
import struct

MAGIC = b"MIGSTRM\x00"
VERSION = 1

#: magic, version u32, flags u32, source uuid (16 bytes)
HEADER = struct.Struct("<8sII16s")

#: every section starts with its type
SECTION_TYPE = struct.Struct("<B")
#: metadata sections: type, 3 pad bytes, payload length u32, then msgpack
META_HEADER = struct.Struct("<B3xI")
#: page batches: type, encoding u8, block index u16, page count u32, then count u64 page indices, then pages
PAGES_HEADER = struct.Struct("<BBHI")

MAX_META_BYTES = 16 << 20
MAX_BATCH_BYTES = 64 << 20
MAX_BATCH_PAGES = 1 << 16
MAX_BLOCKS = 4096


class Section(enum.IntEnum):
    BLOCKS = 0x01  # msgpack [[name, size, page_size], ...]; first section of every stream
    PAGES = 0x02  # binary page batch
    DEVICE = 0x03  # msgpack [id, instance, version, payload]: a device's final state
    DEVICE_PART = 0x04  # msgpack [id, instance, version, chunk]: iterative device state
    COMMAND = 0x05  # msgpack [command, argument]
    PASS = 0x06  # msgpack [pass number]: everything of that pass has been sent (multifd sync point)
    MAPPED_RAM = 0x07  # msgpack [[[name, version, page_size, bitmap_offset, pages_offset], ...], resume_offset]
    END = 0xFF  # no payload: the stream is complete


class PageEncoding(enum.IntEnum):
    RAW = 0  # count × page_size bytes follow
    ZERO = 1  # nothing follows: these pages are zero now
    XBZRLE = 2  # count u16 lengths follow, then each page's XBZRLE encoding against the previous contents


class Command(enum.IntEnum):
    """Command numbers, reserved now for what later features send in COMMAND sections."""

    # on the main stream (source → destination)
    OPEN_RETURN_PATH = 1
    PING = 2
    SWITCHOVER_START = 3
    CONFIG = 4  # capabilities both ends must agree on (mapped-ram, x-ignore-shared)
    UNPOPULATED = 5  # argument: {block: [starts, ends]} page runs the source holds no data in (u64 LE bytes)
    POSTCOPY_ADVISE = 16  # reserved: the advise travels in CONFIG (postcopy-advise)
    POSTCOPY_LISTEN = 17
    POSTCOPY_RUN = 18
    POSTCOPY_RAM_DISCARD = 19
    POSTCOPY_RESUME = 20
    PACKAGED = 21
    POSTCOPY_RECV_BITMAP = 22  # argument: a block name; the destination answers RP_RECV_BITMAP
    COLO_ENABLE = 32  # reserved: x-colo travels in CONFIG ("x-colo")
    COLO_MESSAGE = 33  # argument: [COLOMessage number, argument or None]
    COLO_HEARTBEAT = 34  # the primary is alive (sent while no checkpoint runs)
    COLO_END = 35  # the primary ends replication on purpose (migrate_cancel): the secondary must not take over
    # on the return path (destination → source)
    RP_SHUT = 64  # argument: 0 on success, an error code otherwise
    RP_PONG = 65
    RP_REQ_PAGES = 66
    RP_RECV_BITMAP = 67
    RP_RESUME_ACK = 68
    RP_SWITCHOVER_ACK = 69
    RP_LOADED = 70  # the destination loaded everything and (if it may) runs
    RP_COLO_MESSAGE = 71  # argument: a COLOMessage number (the secondary's replies)
    RP_COLO_OUTPUT = 72  # argument: one message the secondary's program emitted (bytes)
    RP_COLO_HEARTBEAT = 73  # the secondary is alive
