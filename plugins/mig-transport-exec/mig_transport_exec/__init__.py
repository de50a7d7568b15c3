"""The exec migration transport: the stream goes to a child's stdin (outgoing) or comes from its stdout."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Sequence

import structlog

from mig_core.channel import Buffer, Channel, ChannelAborted, ChannelError, FdChannel
from mig_core.schema.migration import MigrationAddress, MigrationAddressType, MigrationExecCommand
from mig_core.transport import Listener, SingleChannelListener, Transport, TransportError

__all__ = ["ExecTransport"]

log = structlog.get_logger("mig.transport.exec")

STDERR_TAIL = 400


def _argv(addr: MigrationAddress) -> list[str]:
    return list(addr.value.args)


class _ChildChannel(FdChannel):
    """A pipe to or from a child; its failure is reported with the child's status and stderr."""

    def __init__(self, proc: subprocess.Popen[bytes], write_fd: int, read_fd: int, what: str) -> None:
        super().__init__(write_fd, read_fd)
        self.proc = proc
        self.what = what
        self._stderr = bytearray()
        self._reader = threading.Thread(target=self._drain_stderr, name="exec-stderr", daemon=True)
        self._reader.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in iter(lambda: self.proc.stderr.read(4096), b""):  # type: ignore[union-attr]
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL]

    def _child_error(self, what: str) -> ChannelError:
        try:
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return ChannelError(f"{what} (command {self.what} still running)")
        self._reader.join(2)
        tail = self._stderr.decode(errors="replace").strip()
        return ChannelError(f"command {self.what} exited with status {code}" + (f": {tail}" if tail else ""))

    def _sendv(self, buffers: Sequence[Buffer]) -> int:
        try:
            return super()._sendv(buffers)
        except ChannelAborted:
            raise
        except ChannelError as e:
            raise self._child_error(str(e)) from None

    def _recv_into(self, view: memoryview) -> int:
        n = super()._recv_into(view)
        if n == 0 and self.proc.wait(5) != 0:
            raise self._child_error("early end of stream")
        return n

    def finish(self) -> None:
        """Close our end and wait for the child: a non-zero status fails the migration."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        code = self.proc.wait()
        if code != 0:
            raise self._child_error("")

    def close(self) -> None:
        super().close()
        if self.proc.poll() is None:
            try:
                self.proc.wait(5)  # with our end closed, a writing child ends at once (EPIPE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ExecTransport(Transport):
    """``exec``: a shell command line (URI) or an argument list (channels)."""

    address_type = MigrationAddressType.EXEC.value
    uri_schemes = ("exec",)
    connects_synchronously = True

    @classmethod
    def parse_uri(cls, uri: str) -> MigrationAddress:
        command = uri.partition(":")[2]
        return MigrationAddress("exec", MigrationExecCommand(args=["/bin/sh", "-c", command]))

    def check_address(self, addr: MigrationAddress, incoming: bool) -> None:
        if not _argv(addr):
            raise TransportError("exec: the command is empty")

    def _spawn(self, addr: MigrationAddress, outgoing: bool) -> _ChildChannel:
        argv = _argv(addr)
        what = repr(argv[2] if argv[:2] == ["/bin/sh", "-c"] else " ".join(argv))
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if outgoing else subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL if outgoing else subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as e:
            raise TransportError(f"failed to run {what}: {e.strerror}") from None
        log.info("exec_started", command=what, pid=proc.pid, outgoing=outgoing)
        pipe = proc.stdin if outgoing else proc.stdout
        assert pipe is not None
        fd = os.dup(pipe.fileno())  # the channel owns its own descriptor; the file object goes
        pipe.close()
        return _ChildChannel(proc, fd if outgoing else -1, -1 if outgoing else fd, what)

    def connect(self, addr: MigrationAddress, abort_check: Callable[[], bool]) -> Channel:
        return self._spawn(addr, outgoing=True)

    def listen(self, addr: MigrationAddress) -> Listener:
        return SingleChannelListener(self._spawn(addr, outgoing=False), "command")
