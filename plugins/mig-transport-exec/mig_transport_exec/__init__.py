"""The exec migration transport: the stream goes to a child's stdin (outgoing) or comes from its stdout."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

import structlog

from mig_core.ext.channel import Buffer, Channel, ChannelAborted, ChannelError, FdChannel
from mig_core.ext.transport import Listener, SingleChannelListener, Transport, TransportError
from mig_core.schema.migration import MigrationAddress, MigrationAddressType, MigrationExecCommand

__all__ = ["ExecTransport"]

log = structlog.get_logger("mig.transport.exec")

STDERR_TAIL = 400


def _argv(addr: MigrationAddress) -> list[str]:
    return list(addr.value.args)


#: Seconds a child may take to exit after the end of the stream (outgoing: after its stdin closed) before
#: the migration fails and its process group is killed. A child that keeps running after the stream ended
#: would otherwise hold the stopped source forever.
EXIT_TIMEOUT = 10.0
#: Seconds between SIGTERM and SIGKILL when a child's process group is ended.
KILL_GRACE = 0.2


class _ChildChannel(FdChannel):
    """A pipe to or from a child in its own process group; its failure is reported with the child's
    status and stderr. However the migration ends, ``close`` leaves no process of the group running."""

    def __init__(self, proc: subprocess.Popen[bytes], write_fd: int, read_fd: int, what: str,
                 exit_timeout: float = EXIT_TIMEOUT) -> None:
        super().__init__(write_fd, read_fd)
        self.proc = proc
        self.what = what
        self.exit_timeout = exit_timeout
        self._pidfd = os.pidfd_open(proc.pid)  # readable once the child has exited (and is not yet reaped)
        self._stderr = bytearray()
        self._reader = threading.Thread(target=self._drain_stderr, name="exec-stderr", daemon=True)
        self._reader.start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in iter(lambda: self.proc.stderr.read(4096), b""):  # type: ignore[union-attr]
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL]

    def _exited(self, timeout: float, abortable: bool = True) -> bool:
        """Wait up to ``timeout`` s for the child to exit (its pidfd turns readable; it is not reaped).

        ``abortable``: an abort wakes the wait and raises ChannelAborted.
        """
        if self._pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        if abortable and self._wake_r >= 0:
            poller.register(self._wake_r, select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ready = {fd for fd, _ in poller.poll(max(0, int(left * 1000)))}
            if self._pidfd in ready:
                return True
            if ready:
                self._check_abort()
            if left <= 0:
                return False

    def _status(self, timeout: float) -> int | None:
        """The child's exit status, or None if it has not exited within ``timeout`` s."""
        if self.proc.returncode is not None:  # reaped already: its pid no longer names the group
            return self.proc.returncode
        if not self._exited(timeout):
            return None
        self._kill_group()  # what the child left behind in its group (the group leader is not reaped yet)
        return self.proc.wait()

    def _child_error(self, what: str) -> ChannelError:
        code = self._status(1.0)
        if code is None:
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
        if n == 0:
            code = self._status(self.exit_timeout)
            if code:  # None (still running with its stdout closed): the stream's own checks decide
                raise self._child_error("early end of stream")
        return n

    def finish(self) -> None:
        """Close our end and wait for the child, at most ``exit_timeout`` s: a non-zero status or a
        child that does not exit fails the migration (nothing says the stream was stored)."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        code = self._status(self.exit_timeout)
        if code is None:
            self._kill_group()
            raise ChannelError(f"command {self.what} did not exit within {self.exit_timeout:g} s after the end "
                               "of the stream")
        if code != 0:
            raise self._child_error("")

    def _kill_group(self) -> None:
        """End every process left in the child's process group: SIGTERM, a moment, then SIGKILL.

        Called while the group leader (the child) is not reaped yet, so its pid still names the group.
        """
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            return
        self._exited(KILL_GRACE, abortable=False)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        super().close()
        if self.proc.returncode is None:
            if not self._exited(0, abortable=False):
                log.info("exec_child_killed", command=self.what, pid=self.proc.pid)
            self._kill_group()
            self.proc.wait()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


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
        argv = _argv(addr)
        if not argv:
            raise TransportError("exec: the command is empty")
        for i, arg in enumerate(argv):
            if "\0" in arg:
                where = "the command" if argv[:2] == ["/bin/sh", "-c"] else f"argument {i}"
                raise TransportError(f"exec: {where} contains a NUL byte")

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
