"""The destination host's side of postcopy: advise, discard, hand over to the page server, complete.

At the postcopy advise (in CONFIG, before any page) this host drops all its RAM, so every page
it does not receive is missing, and starts the page server process early (its
start-up costs no downtime later). Discard ranges name the pages the source
will still send. At the switch (PACKAGED) it registers every block with
userfaultfd in missing mode, keeps those descriptors (a page server that dies
must leave faulting threads waiting, never let the kernel fill zeros), and
passes duplicates and the migration connection to the page server. The host
then loads the devices and runs; its migration thread only waits for the page
server's verdict, in a blocking call that holds no lock and touches no RAM.
"""

from __future__ import annotations

import itertools
import mmap
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import structlog

from mig_core.engine.postcopy.ipc import ControlClosed, ControlConnection
from mig_core.engine.return_path import Message, encode
from mig_core.errors import MigError, StreamError
from mig_core.ext.channel import Channel
from mig_core.host.uffd import REGISTRY, Mode, PageFiller, Registration, UffdError
from mig_core.memory.pagemap import pages_to_runs, runs_to_pages
from mig_core.memory.ram import Backing, RAMBlock

log = structlog.get_logger("mig.postcopy.destination")

_MADV_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", 15)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)


class PageServerFailed(MigError):
    """The page server reported a failure or died; the message names the cause."""


def _exit_description(proc: subprocess.Popen[bytes]) -> str:
    try:
        code = proc.wait(2)
    except subprocess.TimeoutExpired:
        return "it stopped answering"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


class PostcopyIncoming:
    """One destination's postcopy: from the advise to the page server's last page."""

    def __init__(self, blocks: Sequence[RAMBlock], front_link: Callable[[], socket.socket | None] = lambda: None,
                 recovery_tls: Callable[[], dict[str, Any] | None] = lambda: None) -> None:
        """``front_link``: a connection to the host's monitor front, if it has one (see mig_core.qmp.front);
        ``recovery_tls``: the TLS migrate-recover's listener uses (``EngineContext.recovery_tls``)."""
        self.blocks = list(blocks)
        self._front_link = front_link
        self._recovery_tls = recovery_tls
        self.coming = {b.name: np.zeros(b.npages, dtype=bool) for b in self.blocks}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl: ControlConnection | None = None
        self.pid = 0
        self._registrations: list[Registration] = []
        self.listening = False
        #: Called on the control thread with (status, error) when the page server moves (pause, recovery).
        self.on_status: Callable[[str, str | None], None] = lambda state, error: None
        self._verdicts: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._replies: dict[int, tuple[threading.Event, list[str | None]]] = {}
        self._ids = itertools.count(1)
        self._reader: threading.Thread | None = None
        self._dead: PageServerFailed | None = None
        self._closing = False

    # -- advise ------------------------------------------------------------------------

    def advise(self) -> None:
        """Drop all RAM (every page not received is then missing) and start the page server."""
        for b in self.blocks:
            if b.backing is Backing.HOST or b._mmap is None:
                raise StreamError(f"Postcopy is not supported: RAM block '{b.name}' is a buffer of the host's own, "
                                  "whose pages mig cannot drop")
            if b.backing is Backing.ANONYMOUS:
                # missing pages are filled one page at a time; a huge page would make a fault cost 512 of them
                b._mmap.madvise(_MADV_NOHUGEPAGE)
            b.discard()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        front = self._front_link()
        fds = [theirs.fileno()] + ([front.fileno()] if front is not None else [])
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "mig_core.engine.postcopy.page_server",
                                          *map(str, fds)], pass_fds=fds)
        finally:
            theirs.close()
            if front is not None:
                front.close()
        self.ctl = ControlConnection(ours)
        log.info("page_server_started", pid=self.proc.pid)

    def discard(self, block: RAMBlock, starts: np.ndarray, ends: np.ndarray) -> None:
        """The source will still send these pages: whatever this host holds there is stale."""
        if self.listening:
            raise StreamError("CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (listening)")
        self.coming[block.name][runs_to_pages(starts, ends)] = True

    # -- listen ----------------------------------------------------------------------------

    def listen(self, channel: Channel, source_blocks: Sequence[RAMBlock], received: dict[str, np.ndarray],
               source_uuid: str, preempt: Channel | None = None, blocktime_vcpus: list[int] | None = None) -> None:
        """``blocktime_vcpus``: the vCPU threads' ids, to measure their blocked time (postcopy-blocktime)."""
        """Register RAM with userfaultfd and hand the connection and the descriptors to the page server."""
        ctl = self._control()
        fd = channel.fileno()
        if fd < 0:
            raise StreamError(f"postcopy needs a connection another process can continue ({type(channel).__name__} "
                              "has no descriptor; a TLS session is continued by mig's relay only if postcopy-ram "
                              "was set on this host before the connection arrived)")
        blocks_msg = []
        try:
            for b in source_blocks:
                present = received[b.name] & ~self.coming[b.name]
                self._registrations.append(self._empty_but(b, present))
                blocks_msg.append([b.name, b.size, b.page_size, b.address, np.packbits(present).tobytes(),
                                   np.packbits(self.coming[b.name]).tobytes()])
        except UffdError as e:
            raise StreamError(f"Postcopy is not supported: {e}") from None
        buffered = channel.take_buffered()
        fds = [fd] + ([preempt.fileno()] if preempt is not None else [])
        ctl.send({"op": "listen", "blocks": blocks_msg, "buffered": buffered, "source_uuid": source_uuid,
                  "preempt": None if preempt is None else preempt.take_buffered(), "blocktime_vcpus": blocktime_vcpus,
                  "tls": self._recovery_tls()},
                 [*fds, *(r.fd for r in self._registrations)])
        self.listening = True
        log.info("postcopy_listening", page_server=self.pid,
                 pages_coming=int(sum(int(m.sum()) for m in self.coming.values())))

    def _empty_but(self, b: RAMBlock, present: np.ndarray) -> Registration:
        """Make every page of ``b`` missing except ``present`` ones, and register it (during the downtime).

        Dropping a page frees it, which costs the kernel about 0.3 µs per page: 70 ms for a GiB that
        was all sent once and dirtied again. When most pages go, an anonymous block instead swaps its
        memory for a fresh mapping (page tables only), copies the few present pages back with
        UFFDIO_COPY, and frees the old pages in a thread after the machine runs.
        """
        npresent = int(present.sum())
        if b.backing is Backing.ANONYMOUS and npresent < b.npages // 2:
            moved = b.move_pages_away()
            b._mmap.madvise(_MADV_NOHUGEPAGE)  # type: ignore[union-attr]  # (anonymous: it has a mapping)
            reg = REGISTRY.register(b, Mode.MISSING, owner="postcopy")
            filler, ps = PageFiller(reg.fd), b.page_size
            starts, ends = pages_to_runs(np.flatnonzero(present))
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                filler.copy(b.address + s * ps, moved + s * ps, (e - s) * ps)
            threading.Thread(target=b.release_moved, args=(moved,), name="mig/dst/free-stale", daemon=True).start()
            log.debug("postcopy_fresh_mapping", block=b.name, kept_pages=npresent)
            return reg
        # runs of "not present" rather than only the stale pages: as few calls as there are runs
        absent = np.flatnonzero(~present)
        if len(absent):
            b.discard_runs(*pages_to_runs(absent))
        return REGISTRY.register(b, Mode.MISSING, owner="postcopy")

    def _control(self) -> ControlConnection:
        """The control connection, once the page server said it is ready."""
        if self.ctl is None or self.proc is None:
            raise StreamError("CMD_POSTCOPY_LISTEN in wrong postcopy state (0): no postcopy advise came first")
        if not self.pid:
            try:
                msg, _ = self.ctl.recv()
            except ControlClosed:
                raise self._died() from None
            if msg["op"] != "ready":
                raise PageServerFailed(f"the postcopy page server said {msg['op']!r} instead of 'ready'")
            self.pid = int(msg["pid"])
            self._reader = threading.Thread(target=self._read, name="mig/dst/pc-ctl", daemon=True)
            self._reader.start()
        return self.ctl

    def _read(self) -> None:
        """The control thread: status changes, replies to requests, the page server's verdict."""
        assert self.ctl is not None
        try:
            while True:
                msg, _ = self.ctl.recv()
                op = msg["op"]
                if op == "status":
                    self.on_status(str(msg["state"]), msg.get("error"))
                elif op == "reply":
                    waiter = self._replies.pop(int(msg.get("id") or 0), None)
                    if waiter is not None:
                        waiter[1].append(msg.get("error"))
                        waiter[0].set()
                elif op in ("complete", "failed"):
                    self._verdicts.put(msg)
        except ControlClosed:
            if not self._closing:
                self._dead = self._died()
            self._verdicts.put(None)
            for event, _ in list(self._replies.values()):
                event.set()

    def request(self, op: str, **args: Any) -> str | None:
        """Ask the page server (migrate-recover, migrate-pause); its error text, or None when it did it."""
        ctl = self._control()
        rid = next(self._ids)
        event, answer = threading.Event(), cast(list[str | None], [])
        self._replies[rid] = (event, answer)
        try:
            ctl.send({"op": op, "id": rid, **args})
        except (ControlClosed, OSError):
            raise self._died() from None
        if not event.wait(10) or not answer:
            raise self._dead or PageServerFailed(f"the postcopy page server did not answer {op}")
        return answer[0]

    def send(self, msg: Message) -> None:
        """Send a return-path message through the page server (it owns the connection now)."""
        command, argument = encode(msg)
        try:
            self._control().send({"op": "rp", "command": int(command), "argument": argument})
        except (ControlClosed, OSError):
            raise self._died() from None

    # -- completion ------------------------------------------------------------------------

    def wait(self) -> dict[str, Any]:
        """Block until every page arrived (then unregister RAM) or the page server failed (PageServerFailed)."""
        self._control()
        msg = self._verdicts.get()
        if msg is None:
            raise self._dead or self._died()
        if msg["op"] == "failed":
            raise PageServerFailed(str(msg.get("error")))
        if msg["op"] != "complete":
            raise PageServerFailed(f"the postcopy page server said {msg['op']!r}")
        self._unregister()
        return {k: v for k, v in msg.items() if k != "op"}

    def _died(self) -> PageServerFailed:
        assert self.proc is not None
        if self._dead is not None:
            return self._dead
        missing = sum(int(m.sum()) for m in self.coming.values())
        how = _exit_description(self.proc)
        error = (f"the postcopy page server (pid {self.proc.pid}) died ({how}); pages that had not arrived "
                 f"(up to {missing}) cannot arrive any more and this machine cannot continue")
        log.error("page_server_died", pid=self.proc.pid, how=how)
        return PageServerFailed(error)

    def _unregister(self) -> None:
        for r in self._registrations:
            REGISTRY.unregister(r)
            if r.block.backing is Backing.ANONYMOUS and r.block._mmap is not None:
                try:
                    r.block._mmap.madvise(_MADV_HUGEPAGE)
                except OSError:
                    pass
        self._registrations.clear()

    def close(self) -> None:
        """Stop the page server (after completion it sends nothing more)."""
        self._closing = True
        if self.ctl is not None:
            try:
                self.ctl.send({"op": "exit"})
            except (ControlClosed, OSError):
                pass
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.ctl is not None:
            self.ctl.sock.shutdown(socket.SHUT_RDWR)
            if self._reader is not None:
                self._reader.join(5)
            self.ctl.close()
            self.ctl = None
        # registrations left now belong to a postcopy that failed: they stay, so a thread touching a page
        # that never arrived waits instead of reading zeros (the host is told the machine cannot continue)
