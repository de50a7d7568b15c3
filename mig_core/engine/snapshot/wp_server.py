"""The background snapshot's fault server: a helper process that saves each page before it is changed.

The source write-protects its RAM (userfaultfd, synchronous mode) and hands this process the only
descriptors of those registrations. Until the snapshot instant this process only lets writes through
and marks their pages (the source protects those again); after it, it saves: a vCPU that writes a
protected page stops in the kernel; this process copies the page's old contents out of the source
(``process_vm_readv``) into the shared rescue log, publishes it, and lifts the protection, which lets the
write through. It also lifts the protection of ranges the migration thread has sent (``unprotect``
messages). It never waits for the source: a vCPU that faults while holding the source's GIL stops the
whole source until this answers.

If this process dies, its descriptors close, the kernel drops every registration and wakes whoever
waits: the program runs on, and the snapshot fails (its log ends).

Run as ``python -m mig_core.engine.snapshot.wp_server CONTROL_FD``.
"""

from __future__ import annotations

import ctypes
import os
import select
import socket
import struct
import sys
from collections.abc import Sequence

import structlog

from mig_core.engine.postcopy.ipc import SWITCH_INTERVAL_S, ControlClosed, ControlConnection
from mig_core.engine.snapshot.rescue_log import ARMED, Layout, RescueLog
from mig_core.host.uffd import UFFD_EVENT_PAGEFAULT, UFFD_MSG, UFFDIO_WRITEPROTECT
from mig_core.logconfig import configure_logging

log = structlog.get_logger("mig.snapshot.wp_server")

_libc = ctypes.CDLL(None, use_errno=True)
_EVENTS_PER_READ = 128


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class FaultServer:
    """Saves pages on write faults into the rescue log; unprotects what the source says it sent."""

    def __init__(self, ctl: ControlConnection, setup: dict, fds: list[int]) -> None:
        self.ctl = ctl
        self.pid = setup["pid"]
        self.blocks = [(int(a), int(s), int(ps)) for a, s, ps in setup["blocks"]]
        layout = Layout(tuple(s // ps for _, s, ps in self.blocks), int(setup["slot_size"]))
        self.log = RescueLog(layout, fds[0])
        self.uffds = fds[1:]
        self.by_fd = {fd: i for i, fd in enumerate(self.uffds)}
        self.slot = 0
        self._wp = ctypes.create_string_buffer(24)
        self._local, self._remote = _Iovec(), _Iovec()
        self.saved = 0
        #: False until the instant (arming: faults are let through and marked), True after (saving)
        self.saving = False

    def _unprotect(self, block: int, start: int, length: int) -> None:
        struct.pack_into("QQQ", self._wp, 0, start, length, 0)  # mode 0: clear write protection, wake waiters
        if _libc.ioctl(self.uffds[block], UFFDIO_WRITEPROTECT, self._wp) != 0:
            err = ctypes.get_errno()
            log.warning("unprotect_failed", block=block, error=os.strerror(err))

    def _save(self, block: int, page: int, address: int) -> None:
        """Copy the page's contents as they are now (write-protected: as at the snapshot instant)."""
        ps = self.blocks[block][2]
        slot = self.slot
        self._local.base = self.log.data[slot].ctypes.data
        self._local.len = ps
        self._remote.base, self._remote.len = address, ps
        n = _libc.process_vm_readv(self.pid, ctypes.byref(self._local), 1, ctypes.byref(self._remote), 1, 0)
        if n != ps:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv of the source's page at {address:#x}: {os.strerror(err)}")
        self.log.publish(slot, block, page)
        self.slot = slot + 1
        self.saved += 1

    def _faults(self, fd: int) -> None:
        block = self.by_fd[fd]
        base, size, ps = self.blocks[block]
        done = self.log.done[block]
        try:
            data = os.read(fd, UFFD_MSG.size * _EVENTS_PER_READ)
        except BlockingIOError:
            return
        for off in range(0, len(data), UFFD_MSG.size):
            event, _r1, _r2, _r3, _flags, address, _tid = UFFD_MSG.unpack_from(data, off)
            if event != UFFD_EVENT_PAGEFAULT:
                continue
            page = (address - base) // ps
            if not 0 <= page < size // ps:
                continue
            if not self.saving:  # before the instant: let the write through, the source protects it again
                done[page] = ARMED
            elif not done[page]:
                self._save(block, page, base + page * ps)
                done[page] = 1  # saved: a second fault on it (before its protection is gone) only wakes
            self._unprotect(block, base + page * ps, ps)

    def _control(self) -> bool:
        """A message from the source; False when it says stop (or is gone)."""
        try:
            msg, _fds = self.ctl.recv()
        except ControlClosed:
            return False
        if msg.get("op") == "instant":
            self.saving = True
            self.ctl.send({"op": "saving"})
            return True
        if msg.get("op") == "unprotect":
            for block, first, end in msg["ranges"]:
                base, _size, ps = self.blocks[block]
                self._unprotect(block, base + first * ps, (end - first) * ps)
            return True
        return msg.get("op") != "stop"

    def run(self) -> int:
        poller = select.poll()
        ctl_fd = self.ctl.sock.fileno()
        poller.register(ctl_fd, select.POLLIN)
        for fd in self.uffds:
            poller.register(fd, select.POLLIN)
        self.ctl.send({"op": "ready"})
        try:
            while True:
                for fd, _ev in poller.poll():
                    if fd == ctl_fd:
                        if not self._control():
                            log.info("wp_server_exit", saved=self.saved)
                            return 0
                    else:
                        self._faults(fd)
        except OSError as e:
            log.error("wp_server_failed", error=str(e))
            return 1


def main(argv: Sequence[str]) -> int:
    configure_logging()
    if len(argv) != 2:
        log.error("wp_server_usage", usage="python -m mig_core.engine.snapshot.wp_server CONTROL_FD")
        return 2
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -15)  # answer faults before the source's own threads run
    except OSError:
        pass
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    ctl = ControlConnection(socket.socket(fileno=int(argv[1])))
    try:
        ctl.send({"op": "hello"})
        setup, fds = ctl.recv()
    except ControlClosed:
        return 1
    return FaultServer(ctl, setup, fds).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
