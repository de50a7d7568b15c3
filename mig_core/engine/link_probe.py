"""A short bandwidth probe to a destination that waits for an incoming migration (the advisor's link figure).

The source connects to the migration address as a migration would and sends ``PROBE_MAGIC``, then chunks
(a u32 length and that many bytes) for the probe's duration, then a zero length; the destination counts
what arrived and answers with that count (u64), so the rate measured is what reached the other side. The
destination serves each probe in a thread of its own and goes on waiting for the migration: a probe never
starts, fails or delays the migration it precedes.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass

import structlog

from mig_core.ext.channel import Channel, ChannelError

log = structlog.get_logger("mig.link_probe")

PROBE_MAGIC = b"MIGPROBE"
_LEN = struct.Struct("<I")
_COUNT = struct.Struct("<Q")
CHUNK = 1 << 20
#: a chunk longer than this ends the probe (a corrupt or hostile peer)
MAX_CHUNK = 16 << 20
#: a probe that sends for longer than this is cut off by the destination
MAX_SECONDS = 30.0


class ProbeError(Exception):
    """The probe could not measure the link (the peer refused it, or the connection broke)."""


@dataclass(frozen=True)
class ProbeResult:
    """Bytes the destination confirmed, over seconds from the first byte sent to its answer."""

    bytes: int
    seconds: float

    @property
    def bytes_per_second(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


def probe(channel: Channel, seconds: float) -> ProbeResult:
    """Send for ``seconds`` over a fresh connection to a destination, then read its count; closes ``channel``."""
    payload = os.urandom(CHUNK)  # incompressible, in case anything on the way compresses
    head = _LEN.pack(CHUNK)
    sent = 0
    try:
        t0 = time.monotonic()
        channel.send(PROBE_MAGIC)
        while time.monotonic() - t0 < seconds:
            channel.sendv([head, payload])
            sent += CHUNK
        channel.send(_LEN.pack(0))
        (received,) = _COUNT.unpack(channel.recv_exact(_COUNT.size))
        elapsed = time.monotonic() - t0
    except (ChannelError, OSError) as e:
        raise ProbeError(f"the link probe failed after {sent} bytes: {e}") from None
    finally:
        channel.close()
    if received != sent:
        raise ProbeError(f"the destination received {received} of the {sent} bytes probed")
    return ProbeResult(received, elapsed)


def serve(channel: Channel) -> threading.Thread:
    """Count one probe's bytes (after its magic) and answer, in a thread of its own that never raises; a
    peer that stalls is cut off after ``MAX_SECONDS`` (whoever stops waiting may ``channel.abort()`` sooner)."""

    def run() -> None:
        buf = bytearray(CHUNK)
        total = 0
        t0 = time.monotonic()
        deadline = threading.Timer(MAX_SECONDS, channel.abort, args=("link probe too long",))
        deadline.daemon = True
        deadline.start()
        try:
            while True:
                (n,) = _LEN.unpack(channel.recv_exact(_LEN.size))
                if n == 0:
                    channel.send(_COUNT.pack(total))
                    log.info("link_probe_served", bytes=total, seconds=round(time.monotonic() - t0, 3))
                    return
                if n > MAX_CHUNK:
                    log.warning("link_probe_refused", reason="chunk too long", length=n)
                    return
                if n > len(buf):
                    buf = bytearray(n)
                channel.recv_into(memoryview(buf)[:n])
                total += n
        except (ChannelError, OSError) as e:
            log.info("link_probe_broken", bytes=total, error=str(e))
        finally:
            deadline.cancel()
            channel.close()

    thread = threading.Thread(target=run, name="mig/link-probe", daemon=True)
    thread.start()
    return thread
