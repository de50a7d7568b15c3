"""The destination's side of one multifd channel for tests that drive a ``MultifdSender`` directly: every
packet's pages decoded into an array, as a destination decodes them into its RAM."""

from __future__ import annotations

import socket

import numpy as np

from mig_core.ext.channel import SocketChannel
from mig_core.ext.compressor import Decoder
from mig_core.stream.multifd import PacketFlag, read_init, read_packet


def receive_channel(sock: socket.socket, decoder: Decoder, npages: int, landed: np.ndarray,
                    page_size: int = 4096) -> list[tuple[int, np.ndarray]]:
    """Read channel 0 of 1 (one block of ``npages``) until FIN, each packet's pages into ``landed`` (a uint8
    array of the block's size); returns (flags, pages) of every packet that carried pages. A packet's pages
    must be one run (what a sender of one-run jobs makes), else AssertionError."""
    ch = SocketChannel(sock)
    read_init(ch, ch.recv_exact(8), 1, set())
    got: list[tuple[int, np.ndarray]] = []
    while not (pkt := read_packet(ch, 0, 1, [npages], compressed=True)).flags & PacketFlag.FIN:
        if not len(pkt.normal):
            continue
        got.append((int(pkt.flags), pkt.normal))
        start, n = int(pkt.normal[0]), len(pkt.normal)
        assert list(pkt.normal) == list(range(start, start + n)), "a packet's pages are not one run"
        out = landed[start * page_size:(start + n) * page_size].data
        if pkt.flags & PacketFlag.COMPRESSED:
            decoder.decompress_into(ch.recv_exact(pkt.payload_size), out)
        else:
            ch.recv_into(out)
    return got
