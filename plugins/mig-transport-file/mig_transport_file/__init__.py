"""The file migration transport: checkpoint to a file and restore from it (a stream, or mapped-ram)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable

import structlog

from mig_core.ext.channel import Channel, FdChannel
from mig_core.ext.transport import Listener, SingleChannelListener, Transport, TransportError
from mig_core.schema.migration import FileMigrationArgs, MigrationAddress, MigrationAddressType

__all__ = ["FileTransport", "parse_offset"]

log = structlog.get_logger("mig.transport.file")

_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}
#: the largest offset a file can have (off_t): the schema's uint64 goes further
MAX_OFFSET = (1 << 63) - 1


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
        if addr.value.offset > MAX_OFFSET:
            raise TransportError(f"file: offset {addr.value.offset} is beyond the largest a file can have "
                                 f"({MAX_OFFSET})")

    def _open(self, args: FileMigrationArgs, incoming: bool, extra: bool = False,
              direct_io: bool = False) -> _FileChannel:
        """The main channel truncates the file at the offset (as QEMU); extra ones (multifd with
        mapped-ram) open it again for positioned I/O, with O_DIRECT if direct-io is on."""
        # O_NONBLOCK: opening a FIFO must not wait for its other end (it would hold the monitor); a FIFO
        # is then refused by the seek below, as file: needs a file it can seek in
        flags = os.O_CLOEXEC | os.O_NONBLOCK | (os.O_DIRECT if direct_io else 0)
        fd = -1
        try:
            if incoming:
                fd = os.open(args.filename, os.O_RDONLY | flags)
            else:
                fd = os.open(args.filename, os.O_WRONLY | os.O_CREAT | flags, 0o600)
                if not extra:
                    os.ftruncate(fd, args.offset)
            if not extra:
                os.lseek(fd, args.offset, os.SEEK_SET)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            if not isinstance(e, OSError):
                raise
            if direct_io and e.errno == errno.EINVAL:
                raise TransportError(f"Could not open '{args.filename}' with O_DIRECT (direct-io): its file system "
                                     "does not support direct I/O") from None
            raise TransportError(f"Could not open '{args.filename}': {e.strerror}") from None
        log.info("file_opened", path=args.filename, offset=args.offset, incoming=incoming, extra=extra,
                 direct_io=direct_io)
        return _FileChannel(-1, fd) if incoming else _FileChannel(fd, -1)

    def connect(self, addr: MigrationAddress, abort_check: Callable[[], bool]) -> Channel:
        return self._open(addr.value, incoming=False)

    def connect_extra(self, addr: MigrationAddress, abort_check: Callable[[], bool], direct_io: bool) -> Channel:
        return self._open(addr.value, incoming=False, extra=True, direct_io=direct_io)

    def listen(self, addr: MigrationAddress) -> Listener:
        args = addr.value
        return SingleChannelListener(self._open(args, incoming=True), "file",
                                     extra=lambda direct_io: self._open(args, True, True, direct_io))
