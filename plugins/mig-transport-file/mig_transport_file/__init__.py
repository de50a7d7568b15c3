"""The file migration transport: checkpoint to a file, restore from it (sequential stream)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import structlog

from mig_core.channel import Channel, FdChannel
from mig_core.schema.migration import FileMigrationArgs, MigrationAddress, MigrationAddressType
from mig_core.transport import Listener, SingleChannelListener, Transport, TransportError

__all__ = ["FileTransport", "parse_offset"]

log = structlog.get_logger("mig.transport.file")

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_offset(text: str) -> int:
    """QEMU's size syntax: decimal or 0x hex, optional K/M/G/T/P/E suffix."""
    m = re.fullmatch(r"(0[xX][0-9a-fA-F]+|\d+)([kKmMgGtTpPeE]?)", text)
    if not m:
        raise TransportError(f"file URI has bad offset {text}")
    value = int(m.group(1), 0) * _SUFFIX[m.group(2).lower()]
    if value >= 1 << 64:
        raise TransportError(f"file URI has bad offset {text}")
    return value


class _FileChannel(FdChannel):
    """A regular file read or written sequentially from an offset; finish() flushes it to disk."""

    def finish(self) -> None:
        if self.write_fd >= 0:
            os.fsync(self.write_fd)


class FileTransport(Transport):
    """``file``: ``file:PATH[,offset=N]`` or ``{filename, offset}``."""

    address_type = MigrationAddressType.FILE.value
    uri_schemes = ("file",)
    connects_synchronously = True

    @classmethod
    def parse_uri(cls, uri: str) -> MigrationAddress:
        rest = uri.partition(":")[2]
        path, sep, offset = rest.partition(",offset=")
        return MigrationAddress("file", FileMigrationArgs(filename=path, offset=parse_offset(offset) if sep else 0))

    def check_address(self, addr: MigrationAddress, incoming: bool) -> None:
        if not addr.value.filename:
            raise TransportError("file: the file name is empty")

    def _open(self, args: FileMigrationArgs, incoming: bool) -> _FileChannel:
        try:
            if incoming:
                fd = os.open(args.filename, os.O_RDONLY | os.O_CLOEXEC)
            else:
                fd = os.open(args.filename, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.ftruncate(fd, args.offset)
            os.lseek(fd, args.offset, os.SEEK_SET)
        except OSError as e:
            raise TransportError(f"Could not open '{args.filename}': {e.strerror}") from None
        log.info("file_opened", path=args.filename, offset=args.offset, incoming=incoming)
        return _FileChannel(-1, fd) if incoming else _FileChannel(fd, -1)

    def connect(self, addr: MigrationAddress, abort_check: Callable[[], bool]) -> Channel:
        return self._open(addr.value, incoming=False)

    def listen(self, addr: MigrationAddress) -> Listener:
        return SingleChannelListener(self._open(addr.value, incoming=True), "file")
