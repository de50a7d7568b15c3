"""TLS on a migration's channels: a transport and a listener that wrap every channel they open.

The source wraps each connection (main and multifd) as it opens it, on the migration thread; the
destination runs each arriving connection's handshake on a thread of its own, so a peer that connects
and stays silent delays nobody, and a refused handshake (wrong CA, hostname, authz…) leaves the
listener waiting for the next source, as QEMU's does. Handshakes are bounded by ``HANDSHAKE_TIMEOUT``
and end at once on cancel. With postcopy a destination's sessions on sockets end in a relay process, so
the plain connection the host reads can be handed to the page server (``mig_core.engine.tls_relay``).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import structlog

from mig_core.engine.tls_handshake import bounded
from mig_core.engine.tls_relay import RelayProcess
from mig_core.errors import ChannelAborted, ChannelError
from mig_core.ext.authz import AuthzCheck
from mig_core.ext.channel import Channel, SocketChannel
from mig_core.ext.channel_security import ChannelSecurity
from mig_core.ext.transport import Listener, Transport, TransportError
from mig_core.schema.migration import MigrationAddress, MigrationAddressType
from mig_core.schema.sockets import InetSocketAddress, SocketAddress, SocketAddressType

log = structlog.get_logger("mig.tls")


def address_hostname(addr: MigrationAddress) -> str | None:
    """The host a tcp address names (the certificate must match it), None for the others."""
    if addr.tag is MigrationAddressType.SOCKET:
        sa = addr.value
        assert isinstance(sa, SocketAddress)
        if sa.tag is SocketAddressType.INET:
            inet = sa.value
            assert isinstance(inet, InetSocketAddress)
            return inet.host
    return None


class TlsTransport(Transport):
    """``inner`` with every outgoing channel wrapped by ``security`` (the source's credentials)."""

    address_type = "tls"
    uri_schemes = ()

    def __init__(self, inner: Transport, security: ChannelSecurity, hostname: str | None) -> None:
        super().__init__(inner.ctx)
        self.inner = inner
        self.security = security
        self.hostname = hostname

    @classmethod
    def parse_uri(cls, uri: str) -> MigrationAddress:
        raise TransportError("TLS wraps another transport; it has no URI of its own")

    def check_address(self, addr: MigrationAddress, incoming: bool) -> None:
        self.inner.check_address(addr, incoming)

    def _wrap(self, open_channel: Callable[[], Channel], abort_check: Callable[[], bool]) -> Channel:
        channel = open_channel()
        try:
            return bounded(channel, lambda: self.security.wrap_client(channel, self.hostname), abort_check)
        except ChannelError as e:
            log.warning("tls_handshake_failed", side="source", creds=self.security.creds_id, reason=str(e))
            raise

    def connect(self, addr: MigrationAddress, abort_check: Callable[[], bool]) -> Channel:
        return self._wrap(lambda: self.inner.connect(addr, abort_check), abort_check)

    def connect_extra(self, addr: MigrationAddress, abort_check: Callable[[], bool], direct_io: bool) -> Channel:
        return self._wrap(lambda: self.inner.connect_extra(addr, abort_check, direct_io), abort_check)

    def listen(self, addr: MigrationAddress) -> Listener:
        raise TransportError("a TLS transport for the source does not listen")


class TlsListener(Listener):
    """``inner`` whose connections reach ``accept`` only once their handshake succeeded."""

    def __init__(self, inner: Listener, security: ChannelSecurity, authz: Callable[[], AuthzCheck | None],
                 relayed: Callable[[], bool] = lambda: True) -> None:
        """``authz``: ``tls-authz`` as it stands when a connection arrives (None: every verified peer);
        ``relayed``: whether a socket's session arriving now ends in the relay process, so that postcopy
        can hand its plain connection on (otherwise it ends here, which costs less: no extra copies)."""
        self.inner = inner
        self.security = security
        self.authz = authz
        self.relayed = relayed
        self._relay: RelayProcess | None = RelayProcess() if relayed() else None
        self._relay_lock = threading.Lock()
        self._ready: queue.Queue[Channel | BaseException] = queue.Queue()
        self._closed = threading.Event()
        self._last_refusal: str | None = None
        self._pending = 0
        #: the inner listener gave its last connection (a single-use one, or closed)
        self._inner_done = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, name="tls-accept", daemon=True).start()

    @property
    def socket_addresses(self) -> list[SocketAddress]:
        return self.inner.socket_addresses

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                channel = self.inner.accept()
            except (ChannelError, OSError):
                self._finish()
                return
            with self._lock:
                self._pending += 1
            threading.Thread(target=self._handshake, args=(channel,), name="tls-handshake", daemon=True).start()

    def _finish(self) -> None:
        """The inner listener gave its last connection: once no handshake is left, accept reports why."""
        with self._lock:
            self._inner_done = True
            idle = self._pending == 0
        if idle:
            self._ready.put(self._ending())

    def _ending(self) -> BaseException:
        if self._closed.is_set() or self._last_refusal is None:
            return ChannelAborted("the TLS listener was closed")
        return ChannelError(self._last_refusal)

    def _handshake(self, channel: Channel) -> None:
        try:
            authz = self.authz()
            if isinstance(channel, SocketChannel) and self.relayed():
                wrapped: Channel | None = self._relay_process().open(channel, self.security.describe(), authz,
                                                                     self._closed.is_set)
            else:
                wrapped = bounded(channel, lambda: self.security.wrap_server(channel, authz), self._closed.is_set)
        except (ChannelError, OSError) as e:
            self._last_refusal = str(e)
            log.warning("tls_handshake_refused", side="destination", creds=self.security.creds_id, reason=str(e))
            wrapped = None
        with self._lock:
            self._pending -= 1
            last = self._pending == 0 and self._inner_done
        if wrapped is not None:
            log.info("tls_session_accepted", creds=self.security.creds_id)
            self._ready.put(wrapped)
        elif last:
            self._ready.put(self._ending())

    def _relay_process(self) -> RelayProcess:
        with self._relay_lock:
            if self._closed.is_set():
                raise ChannelError("cancelled during the TLS handshake")
            if self._relay is not None and self._relay.proc.poll() is not None:
                log.warning("tls_relay_restarted", pid=self._relay.proc.pid, status=self._relay.proc.returncode)
                self._relay.close()  # (it died, killed perhaps: sessions it forked go on)
                self._relay = None
            if self._relay is None:
                self._relay = RelayProcess()
            return self._relay

    def accept(self) -> Channel:
        item = self._ready.get()
        if isinstance(item, BaseException):
            self._ready.put(item)  # every later accept fails the same way
            raise item
        return item

    def close(self) -> None:
        self._closed.set()
        self.inner.close()
        with self._relay_lock:
            relay, self._relay = self._relay, None
        if relay is not None:
            relay.close()
        self._ready.put(ChannelAborted("the TLS listener was closed"))
