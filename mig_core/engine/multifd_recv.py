"""Multifd on the destination: one thread per channel loads page packets straight into RAM.

A channel thread that reads the SYNC packet of pass n parks until the main
stream reaches the PASS n marker and the main thread has seen every channel
park: so no page of pass n+1 lands before every page of pass n did, whichever
channels carried them. Any channel error fails the whole load (the main
channel is aborted with the reason).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence

import numpy as np
import structlog

from mig_core.ext.channel import Channel, ChannelEOF, ChannelError
from mig_core.ext.compressor import Decoder
from mig_core.memory.ram import RAMBlock
from mig_core.stream.checksum import SuspectPages
from mig_core.stream.multifd import MultifdError, PacketFlag, read_packet, read_page_hashes
from mig_core.stream.placement import PagePlacer

log = structlog.get_logger("mig.multifd")


class MultifdReceiver:
    """Channel threads for one incoming migration; the main thread calls ``wait_sync`` and ``finish``."""

    def __init__(self, channels: Sequence[Channel], blocks: Sequence[RAMBlock], placer: PagePlacer,
                 decoder_factory: Callable[[], Decoder] | None, on_error: Callable[[str], None],
                 suspects: SuspectPages | None = None) -> None:
        self.channels = list(channels)
        #: x-checksums: where pages whose checksum failed are kept (shared with the main stream's reader)
        self.suspects = suspects
        self.blocks = list(blocks)  # indexed as the source numbered them
        self.placer = placer
        self.decoder_factory = decoder_factory
        self.on_error = on_error
        self.error: str | None = None
        self._cond = threading.Condition()
        self._synced = [0] * len(self.channels)
        self._released = 0
        self.threads = [threading.Thread(target=self._thread, args=(i,), name=f"mig/dst/recv_{i}", daemon=True)
                         for i in range(len(self.channels))]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise ChannelError(self.error)

    def wait_sync(self, pass_number: int) -> None:
        """The main stream reached PASS ``pass_number``: wait for every channel's SYNC, then release them."""
        with self._cond:
            while self.error is None and min(self._synced) < pass_number:
                self._cond.wait(0.5)
            self._raise_if_failed()
            self._released = max(self._released, pass_number)
            self._cond.notify_all()

    def finish(self) -> None:
        """The main stream ended: every channel must end with its FIN packet."""
        for t in self.threads:
            while t.is_alive():
                t.join(0.5)
                self._raise_if_failed()
        self._raise_if_failed()

    def abort(self, reason: str) -> None:
        for ch in self.channels:
            ch.abort(reason)
        with self._cond:
            if self.error is None:
                self.error = reason
            self._cond.notify_all()

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    # -- channel threads -----------------------------------------------------------------

    def _fail(self, message: str) -> None:
        with self._cond:
            first = self.error is None
            if first:
                self.error = message
            self._cond.notify_all()
        if first:
            log.error("multifd_receive_failed", error=message)
            for ch in self.channels:
                ch.abort(message)
            self.on_error(message)

    def _thread(self, i: int) -> None:
        try:
            self._receive(i)
        except MultifdError as e:
            self._fail(str(e))
        except ChannelError as e:
            if self.error is None:
                self._fail(f"multifd {i}: {e}")
        except (ValueError, OSError) as e:
            self._fail(f"multifd {i}: {e}")

    def _receive(self, i: int) -> None:
        ch = self.channels[i]
        decoder = self.decoder_factory() if self.decoder_factory is not None else None
        nblocks = len(self.blocks)
        block_pages = [b.npages for b in self.blocks]
        staging = np.empty(0, dtype=np.uint8)
        wire = np.empty(0, dtype=np.uint8)

        suspects = self.suspects

        def land(block: RAMBlock, pages: np.ndarray, fill: Callable[[memoryview], None]) -> None:
            """``fill`` the pages' bytes straight into RAM where they are one run, else into a reused
            staging buffer that the placer copies from (with x-checksums, each page's is checked first)."""
            nonlocal staging
            direct = self.placer.direct_view(block, pages)
            if direct is not None:
                fill(direct)
                if suspects is not None:
                    suspects.check(block, pages, read_page_hashes(ch, i, len(pages)))
                self.placer.place(block, pages, None)
                return
            size = len(pages) * block.page_size
            if staging.nbytes < size:
                staging = np.empty(size, dtype=np.uint8)
            fill(staging[:size].data)
            rows = staging[:size].reshape(len(pages), block.page_size)
            if suspects is not None:
                suspects.check(block, pages, read_page_hashes(ch, i, len(pages)), rows)
            self.placer.place(block, pages, rows)

        while True:
            pkt = read_packet(ch, i, nblocks, block_pages, decoder is not None, suspects is not None)
            if pkt.flags & PacketFlag.FIN:
                return
            if pkt.flags & PacketFlag.SYNC:
                with self._cond:
                    self._synced[i] = pkt.pass_number
                    self._cond.notify_all()
                    while self._released < pkt.pass_number and self.error is None:
                        self._cond.wait(0.5)
                if self.error is not None:
                    return
                continue
            block = self.blocks[pkt.block]
            ps, n = block.page_size, len(pkt.normal)
            if n:
                try:
                    if decoder is not None and pkt.flags & PacketFlag.COMPRESSED:
                        # a reused buffer: a fresh packet-sized one per packet costs page faults each time
                        # (np.empty: a zeroed bytearray would also write all of it once)
                        if len(wire) < pkt.payload_size:
                            wire = np.empty(pkt.payload_size, dtype=np.uint8)
                        packet = wire.data[:pkt.payload_size]
                        ch.recv_into(packet)
                        land(block, pkt.normal, functools.partial(decoder.decompress_into, packet))
                    else:
                        if pkt.payload_size != n * ps:
                            raise MultifdError(f"multifd {i}: packet size received {pkt.payload_size} size "
                                               f"expected {n * ps}")
                        land(block, pkt.normal, ch.recv_into)
                except ChannelEOF:
                    raise MultifdError(f"multifd {i}: unexpected EOF inside a packet's pages") from None
            if len(pkt.zero):
                if suspects is not None:  # zero now, under a framing checksum that held
                    suspects.clear(block, pkt.zero)
                # only a page this host already received can hold data: the rest are zero or are dropped
                # at the end with whatever this host held before the migration
                received = self.placer.received[block.name]
                stale = pkt.zero[received[pkt.zero]]
                if len(stale):
                    self.placer.place_zero(block, stale)
