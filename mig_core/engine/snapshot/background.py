"""Background snapshot (capability ``background-snapshot``): the machine as it was at one instant, written
while it keeps running.

Before the instant the dirty tracker lets go of RAM and every block is write-protected (userfaultfd,
synchronous mode, never-populated pages too) with the fault server (``wp_server``, a helper process)
letting writes through meanwhile; at the instant the machine stops for a moment: device state is saved
into memory, the pages written while arming are protected again, the fault server starts saving, and the
machine runs again. Then
the migration thread streams RAM chunk by chunk: it copies the chunk, sends first the pages the fault
server saved meanwhile (their contents at the instant, from the rescue log), then the chunk's pages
nobody saved, and asks the fault server to lift the chunk's protection. At the end the device state
saved at the instant follows, and the tracker takes RAM back (every page counts as written once).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys

import numpy as np
import structlog

from mig_core.engine.postcopy.ipc import ControlClosed, ControlConnection
from mig_core.engine.snapshot.rescue_log import ARMED, Layout, RescueLog
from mig_core.engine.snapshot.vmstate import device_sections
from mig_core.engine.stats import now_ms
from mig_core.engine.switchover import SwitchoverEngine, stop_for_switchover
from mig_core.errors import MigrationFailed
from mig_core.host import uffd
from mig_core.memory.pagemap import pages_to_runs
from mig_core.memory.ram import RAMBlock
from mig_core.memory.zeropage import zero_rows
from mig_core.schema.migration import MigrationStatus as S

log = structlog.get_logger("mig.snapshot.background")

#: Pages copied and sent at once (4 MiB of 4 KiB pages).
CHUNK_PAGES = 1024
#: Rounds of protecting again, while the machine runs, the pages written during arming (each round takes
#: less time, so fewer pages are written in it); stop early once this few are left.
ARM_ROUNDS, ARM_ENOUGH = 4, 64
_PR_SET_PTRACER = 0x59616D61


class FaultServerLink:
    """The fault server process and its control connection (started before the instant: no start-up cost
    in the downtime)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "mig_core.engine.snapshot.wp_server",
                                          str(theirs.fileno())], pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.ctl = ControlConnection(ours)
        # Yama (where it is on) lets a process read another's memory only if that one allows it
        with contextlib.suppress(OSError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PTRACER, self.proc.pid, 0, 0, 0)

    def _recv(self, expect: str) -> None:
        try:
            msg, _ = self.ctl.recv()
        except (ControlClosed, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            raise MigrationFailed(self.dead() or "the snapshot's fault server closed its connection") from None
        if msg.get("op") != expect:
            raise MigrationFailed(f"the snapshot's fault server did not start: {msg}")

    def wait_started(self) -> None:
        """Until the process has started (Python and its imports): before the instant, not in the downtime."""
        self._recv("hello")

    def start(self, log_fd: int, regs: list[uffd.Registration], layout: Layout) -> None:
        blocks = [[r.block.address, r.block.size, r.block.page_size] for r in regs]
        self.ctl.send({"op": "setup", "pid": os.getpid(), "blocks": blocks, "slot_size": layout.slot_size},
                      [log_fd] + [r.fd for r in regs])
        self._recv("ready")

    def instant(self) -> None:
        """Switch the fault server from arming to saving (it answers once it has)."""
        try:
            self.ctl.send({"op": "instant"})
        except (ControlClosed, OSError):
            pass  # _recv reports why
        self._recv("saving")

    def unprotect(self, block: int, first: int, end: int) -> None:
        try:
            self.ctl.send({"op": "unprotect", "ranges": [[block, first, end]]})
        except (ControlClosed, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            raise MigrationFailed(self.dead() or "the snapshot's fault server closed its connection") from None

    def stop(self) -> None:
        with contextlib.suppress(OSError, ControlClosed):
            self.ctl.send({"op": "stop"})
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.ctl.sock.close()

    def dead(self) -> str | None:
        """Why the fault server is gone (None while it runs)."""
        rc = self.proc.poll()
        if rc is None:
            return None
        how = f"killed by signal {-rc}" if rc < 0 else f"status {rc}"
        return f"the snapshot's fault server exited ({how}): the snapshot is incomplete"


class BackgroundSnapshot:
    """One background snapshot, run on the migration thread of ``engine``."""

    def __init__(self, engine: SwitchoverEngine) -> None:
        self.engine = engine
        self.blocks: list[RAMBlock] = list(engine.machine.blocks)
        self.regs: list[uffd.Registration] = []
        self.rescue: RescueLog | None = None
        self.server: FaultServerLink | None = None
        self.tail = 0
        self.released = False

    def run(self) -> None:
        e = self.engine
        self.server = FaultServerLink()
        try:
            self.server.wait_started()
            devices = self._instant()
            self._stream()
            e.writer.channel.send(devices)  # the device state of the instant, as stream sections
            e.writer.write_end()
            e._flush()
            e._ch.finish()
            e._account(0, running=True)
        finally:
            self._cleanup()
        c = e.counters
        c.finish()
        c.downtime_ms = self.downtime_ms
        if not e.status.cas(S.ACTIVE, S.COMPLETED):
            e._check_cancel()
        log.info("background_snapshot_completed", total_ms=c.total_time(), downtime_ms=self.downtime_ms,
                 transferred=c.transferred, saved_on_fault=self.tail)

    def _instant(self) -> bytes:
        """Arm while the machine runs, then stop it for the instant itself: device state, and protection
        back on the few pages written while arming; hand RAM to the fault server and run again.

        Write-protecting a GiB of small pages takes ~20 ms, so it is done before the stop: the fault server
        starts in *arming* mode, where a write fault only lifts the protection and marks the page
        (``done`` = 2). At the instant it switches to saving mode, and only the marked pages are
        protected again while the machine is stopped.
        """
        e = self.engine
        assert self.server is not None
        ps = max(b.page_size for b in self.blocks)
        layout = Layout(tuple(b.npages for b in self.blocks), ps)
        rescue = self.rescue = RescueLog.create(layout)
        self.released = e.machine.release_tracker()
        for b in self.blocks:
            self.regs.append(uffd.REGISTRY.register(b, uffd.Mode.WP_SYNC, owner="background snapshot"))
        self.server.start(rescue.fd, self.regs, layout)  # arming: faults are let through and marked
        for reg in self.regs:
            reg.writeprotect()
        for _ in range(ARM_ROUNDS):  # while running, like precopy passes: fewer pages to protect when stopped
            if self._protect_again() <= ARM_ENOUGH:
                break
        stop_for_switchover(e)
        t0 = now_ms()
        e.ctx.hooks.switchover(e.ctx.migration_id, e.status.side)
        try:
            devices = device_sections(e.machine)
            self.server.instant()  # saving from now on
            t1 = now_ms()
            rearmed = self._protect_again()
            log.debug("background_snapshot_instant_steps", stop_ms=t0 - (e.counters.downtime_start_ms or t0),
                      devices_and_switch_ms=t1 - t0, protect_again_ms=now_ms() - t1)
            for reg in self.regs:  # the fault server's descriptors are the only ones: if it dies, RAM is free
                uffd.REGISTRY.hand_over(reg)
        finally:
            before = e._runstate_before
            if before is not None:
                e.machine.run.set(before)  # the machine runs again: the downtime ends
                e._runstate_before = None
            self.downtime_ms = now_ms() - (e.counters.downtime_start_ms or now_ms())
        log.info("background_snapshot_instant", downtime_ms=self.downtime_ms, protected_again=rearmed)
        return devices

    def _protect_again(self) -> int:
        """Protect again the pages the fault server let writes through on while arming; how many.

        The mark is cleared before the protection goes on: a write in between needs no fault (it is before
        the instant), and one after the protection faults and is marked again."""
        assert self.rescue is not None
        count = 0
        for bi, reg in enumerate(self.regs):
            done = self.rescue.done[bi]
            marked = np.flatnonzero(done == ARMED)
            done[marked] = 0
            ps = reg.block.page_size
            for first, end in zip(*(r.tolist() for r in pages_to_runs(marked)), strict=True):
                reg.writeprotect(first * ps, (end - first) * ps)
            count += len(marked)
        return count

    def _check(self) -> None:
        self.engine._check_cancel()
        assert self.server is not None
        dead = self.server.dead()
        if dead is not None:
            raise MigrationFailed(dead)

    def _drain(self) -> None:
        """Send the pages the fault server saved since the last drain (their contents at the instant)."""
        rescue = self.rescue
        assert rescue is not None
        head = rescue.head
        if head == self.tail:
            return
        e = self.engine
        index = rescue.index[self.tail:head].copy()
        data = rescue.data[self.tail:head]
        for bi, b in enumerate(self.blocks):
            rows = np.flatnonzero(index[:, 0] == bi)
            if not len(rows):
                continue
            pages = index[rows, 1]
            chunk = data[rows][:, :b.page_size]
            nonzero = ~zero_rows(chunk.view(np.uint64))  # zero at the instant: the destination has zero there
            if nonzero.any():
                order = np.argsort(pages[nonzero], kind="stable")
                e.writer.write_pages(b, pages[nonzero][order], chunk[nonzero][order])
                e.counters.normal += int(nonzero.sum())
            e.counters.duplicate += int((~nonzero).sum())
        rescue.release(self.tail, head)
        self.tail = head
        e._account(0, running=True)

    def _stream(self) -> None:
        e = self.engine
        assert self.rescue is not None and self.server is not None
        for bi, b in enumerate(self.blocks):
            done = self.rescue.done[bi]
            populated = np.zeros(b.npages, dtype=bool)
            populated[b.populated_pages()] = True  # never-populated pages were zero at the instant
            for first in range(0, b.npages, CHUNK_PAGES):
                self._check()
                end = min(first + CHUNK_PAGES, b.npages)
                if not populated[first:end].any():
                    continue
                rows = b.pages[first:end].copy()  # protected pages still hold the instant's contents
                self._drain()  # pages saved before the copy ended: sent from the log, marked done
                pages = np.arange(first, end)[populated[first:end] & (done[first:end] == 0)]
                if len(pages):
                    data = rows[pages - first]
                    nonzero = ~zero_rows(data.view(np.uint64))
                    if nonzero.any():
                        e.writer.write_pages(b, pages[nonzero], data[nonzero])
                    e.counters.normal += int(nonzero.sum())
                    e.counters.duplicate += int((~nonzero).sum())
                    done[pages] = 1
                self.server.unprotect(bi, first, end)
                e._account(0, running=True)
                e.counters.remaining = max(0, e.counters.remaining - (end - first) * b.page_size)
            e._flush()
        self._check()
        self._drain()

    def _cleanup(self) -> None:
        """Every step runs whatever the others did: RAM is never left protected, the tracker comes back."""
        steps = [("unregister", self._forget), ("stop_fault_server", self.server.stop if self.server else None),
                 ("close_rescue_log", self.rescue.close if self.rescue else None),
                 ("reacquire_tracker", self.engine.machine.reacquire_tracker if self.released else None)]
        for name, step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:  # noqa: BLE001 - the next steps and the snapshot's own error still count
                log.exception("background_snapshot_cleanup_failed", step=name)
        self.rescue = None

    def _forget(self) -> None:
        for reg in self.regs:
            uffd.REGISTRY.unregister(reg)  # handed over: only forgotten here; the fault server's exit frees RAM
        self.regs.clear()


def run_background_snapshot(engine: SwitchoverEngine) -> None:
    BackgroundSnapshot(engine).run()
