"""Write-behind for the main migration stream: a thread of its own makes the send calls.

The migration thread tests the next page batch for zeros and frames it while the
kernel still copies the previous one out of RAM (``sendmsg`` releases the GIL), so
the socket never waits for Python between batches. Order is kept: everything goes
through one queue, a few batches deep. What is queued is never copied: page data
stays a view of RAM until it is sent, as with a direct send, and a page written in
between is sent newer and reported dirty again by the next sync.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from mig_core.ext.channel import Buffer, Channel, ChannelError


class WriteBehind:
    """``sendv``/``send`` queue the buffers; ``flush`` waits until they are written, raising any send error."""

    def __init__(self, channel: Channel, depth: int = 2, name: str = "mig/src/writer") -> None:
        self.channel = channel
        self._queue: queue.Queue[list[Buffer] | None] = queue.Queue(maxsize=depth)
        self._cond = threading.Condition()
        self._pending = 0
        self._error: ChannelError | None = None
        #: held around each write to the channel: ``send_now`` writes between two queued writes
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def sendv(self, buffers: Sequence[Buffer]) -> None:
        """Queue ``buffers`` to be written in order; raises the error of an earlier write that failed."""
        self._raise_if_failed()
        with self._cond:
            self._pending += 1
        item = list(buffers)
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._raise_if_failed()

    def send(self, data: Buffer) -> None:
        self.sendv([data])

    def send_now(self, buffers: Sequence[Buffer]) -> None:
        """Write ``buffers`` from the calling thread, ahead of what is queued (never inside another write).

        For data that must not wait behind the queue (a postcopy page a thread is blocked on); the caller
        makes sure its order relative to queued writes does not matter.
        """
        self._raise_if_failed()
        with self._send_lock:
            self.channel.sendv(buffers)

    def flush(self) -> None:
        """Wait until every queued buffer is written (or a write failed: then raise its error)."""
        with self._cond:
            while self._pending and self._error is None:
                self._cond.wait(0.1)
        self._raise_if_failed()

    def close(self) -> None:
        """End the thread; what is still queued is dropped (call after the channel was aborted or flushed)."""
        with self._cond:
            if self._error is None:
                self._error = ChannelError("the stream writer was closed")
        while True:  # make room for the end marker, whatever a blocked writer left queued
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if self._error is None:  # after a failure the rest is dropped, so senders never block
                    with self._send_lock:
                        self.channel.sendv(item)
            except ChannelError as e:
                with self._cond:
                    self._error = self._error or e
            except OSError as e:
                with self._cond:
                    self._error = self._error or ChannelError(f"send failed: {e.strerror or e}")
            finally:
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()
