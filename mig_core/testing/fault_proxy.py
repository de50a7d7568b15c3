"""A fault-injecting TCP proxy, run as its own process: delay, stall, drop or corrupt a migration's bytes.

``python -m mig_core.testing.fault_proxy --listen 127.0.0.1:0 --target HOST:PORT --fault corrupt --at N``
forwards every connection it accepts to the target. The fault applies to one connection (``--conn``, in
the order they arrived: 0 is a migration's main channel) once ``--at`` bytes of its source-to-target
direction have passed:

* ``delay``: every chunk, in both directions, is held ``--ms`` milliseconds before it goes on (latency,
  not a bandwidth cap: the chunks behind it keep arriving meanwhile);
* ``stall``: nothing moves, either way, for ``--ms`` milliseconds (0: never again); the proxy's own
  socket buffers fill up and the sender sees a zero window, as behind a hung middlebox;
* ``drop``: both sides of the connection are reset, as when a path dies;
* ``corrupt``: the byte at offset ``--at`` has its lowest bit flipped, and everything else is forwarded
  as it was: a fault that TCP's own checksum cannot see, since the proxy computes a fresh one.

It prints ``listening PORT`` once ready and ``fault KIND conn=C at=N`` when the fault fires, so a test
waits for that line rather than for a time. This kernel has no ``tc netem``; this is what takes its place.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from mig_core.ext.transport import split_host_port

CHUNK = 1 << 16
#: most bytes a delayed direction holds at once: the reader waits (back-pressure) past this
DELAY_WINDOW = 8 << 20


class FaultProxy:
    """Forwards connections from ``listen`` to ``target``, injecting one fault into connection ``conn``."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], fault: str, at: int, ms: int,
                 conn: int) -> None:
        self.target = target
        self.fault, self.at, self.ms, self.conn = fault, at, ms, conn
        self.server = socket.create_server(listen)
        self.port: int = self.server.getsockname()[1]
        self._count = 0
        self._lock = threading.Lock()
        self._say_lock = threading.Lock()

    def say(self, line: str) -> None:
        """One line of the proxy's interface on stdout (``listening PORT``, ``fault ...``), not a log."""
        with self._say_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def serve(self) -> None:
        self.say(f"listening {self.port}")
        while True:
            client, _ = self.server.accept()
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError as e:
                self.say(f"connect failed {e.strerror}")
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                index, self._count = self._count, self._count + 1
            _Connection(self, index, client, upstream).start()


class _Connection:
    """One forwarded connection: a pump per direction, and the fault if it is the chosen one."""

    def __init__(self, proxy: FaultProxy, index: int, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.index = index
        self.client, self.upstream = client, upstream
        self.faulty = index == proxy.conn
        self.fired = threading.Event()
        #: cleared while the connection stalls; both pumps wait on it
        self.flowing = threading.Event()
        self.flowing.set()

    def start(self) -> None:
        for src, dst, forward in ((self.client, self.upstream, True), (self.upstream, self.client, False)):
            threading.Thread(target=self._pump, args=(src, dst, forward), daemon=True).start()

    def _fire(self) -> None:
        if self.fired.is_set():
            return
        self.fired.set()
        p = self.proxy
        p.say(f"fault {p.fault} conn={self.index} at={p.at}")
        if p.fault == "stall":
            self.flowing.clear()
            if p.ms:
                threading.Timer(p.ms / 1000, self.flowing.set).start()
        elif p.fault == "drop":
            self._reset()

    def _reset(self) -> None:
        for s in (self.client, self.upstream):
            with contextlib.suppress(OSError):  # SO_LINGER 0: close sends a reset
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        p = self.proxy
        delayed = self.faulty and p.fault == "delay"
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        held = threading.Condition()
        size = [0]
        done = [False]
        if delayed:
            threading.Thread(target=self._deliver, args=(dst, queue, held, size, done), daemon=True).start()
        passed = 0  # bytes of this direction forwarded so far
        try:
            while True:
                self.flowing.wait()
                data = src.recv(CHUNK)
                if not data:
                    break
                self.flowing.wait()  # a stall that began while this pump was in recv holds this chunk too
                if self.faulty and forward and not self.fired.is_set() and passed + len(data) > p.at \
                        and p.fault != "none":
                    if p.fault == "corrupt":
                        k = p.at - passed
                        data = data[:k] + bytes([data[k] ^ 1]) + data[k + 1:]
                    elif p.fault in ("stall", "drop"):
                        cut = p.at - passed
                        if cut:
                            dst.sendall(data[:cut])
                        passed += cut
                        data = data[cut:]
                    self._fire()
                    if p.fault == "drop":
                        return
                    self.flowing.wait()
                passed += len(data)
                if delayed:
                    with held:
                        while size[0] > DELAY_WINDOW:
                            held.wait()
                        queue.append((time.monotonic() + p.ms / 1000, data))
                        size[0] += len(data)
                        held.notify_all()
                else:
                    dst.sendall(data)
        except OSError:  # one side reset or vanished: so does the other, as through a real path
            self._reset()
            return
        if delayed:
            with held:
                done[0] = True
                held.notify_all()
            return
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _deliver(self, dst: socket.socket, queue: collections.deque[tuple[float, bytes]],
                 held: threading.Condition, size: list[int], done: list[bool]) -> None:
        """Send each held chunk when its time comes, in order."""
        try:
            while True:
                with held:
                    while not queue and not done[0]:
                        held.wait()
                    if not queue:
                        break
                    due, data = queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
                with held:
                    queue.popleft()
                    size[0] -= len(data)
                    held.notify_all()
        except OSError:
            self._reset()
            return
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class ProxyProcess:
    """The proxy started as a subprocess (what tests use): ``port`` to connect to, ``fired()`` to wait for."""

    def __init__(self, target: str, fault: str = "none", at: int = 0, ms: int = 0, conn: int = 0,
                 listen: str = "127.0.0.1:0") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mig_core.testing.fault_proxy", "--listen", listen, "--target", target,
             "--fault", fault, "--at", str(at), "--ms", str(ms), "--conn", str(conn)],
            stdout=subprocess.PIPE, text=True)
        self._out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        first = self._out.readline()
        if not first.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the fault proxy did not start: {first!r}")
        self.port = int(first.split()[1])
        self.lines: list[str] = []
        self._fired = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._out:
            self.lines.append(line.strip())
            if line.startswith("fault "):
                self._fired.set()

    def fired(self, timeout: float = 60.0) -> bool:
        """Wait until the fault has fired (True), or ``timeout`` seconds (False)."""
        return self._fired.wait(timeout)

    def stop(self) -> None:
        """End the proxy: every connection it still holds closes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mig_core.testing.fault_proxy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--fault", choices=["none", "delay", "stall", "drop", "corrupt"], default="none")
    parser.add_argument("--at", type=int, default=0, help="bytes of the source's stream before the fault")
    parser.add_argument("--ms", type=int, default=0, help="delay per chunk, or how long a stall lasts (0: ever)")
    parser.add_argument("--conn", type=int, default=0, help="which connection (in order of arrival) to fault")
    args = parser.parse_args(argv)
    try:
        listen, target = split_host_port(args.listen), split_host_port(args.target)
    except ValueError as e:
        parser.error(str(e))
    if args.at < 0 or args.ms < 0 or args.conn < 0:
        parser.error("--at, --ms and --conn are not negative")
    proxy = FaultProxy(listen, target, args.fault, args.at, args.ms, args.conn)
    try:
        proxy.serve()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
