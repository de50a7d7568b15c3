"""``tls-creds-psk``: pre-shared keys in a directory laid out as QEMU's (``keys.psk``: ``username:hexkey`` lines).

The source (endpoint ``client``) presents ``username`` (default ``qemu``) and the key its file has for
it; the destination looks the username up in its file, and ``tls-authz`` rules match the username. A
wrong key fails the handshake on both sides, and so does a username the destination does not know.

Python's ``ssl`` has no PSK before 3.13; ``sslpsk3`` adds it (the same calls as 3.13's). On those
Pythons a PSK session is TLS 1.2 with ephemeral (EC)DHE and an AEAD cipher, since an external PSK
over TLS 1.3 needs a fix that arrived with 3.13 (the client's session id context); on 3.13 and newer
it is TLS 1.3, as x509 sessions are.
"""

from __future__ import annotations

import errno
import os
import ssl
import sys
import threading
import weakref
from collections.abc import Callable, Mapping

import sslpsk3
import structlog
from sslpsk3.sslpsk3 import SSLPSKObject, psk_contexts

from mig_core.errors import ChannelError
from mig_core.ext.channel import Channel
from mig_core.ext.channel_security import Authorize, ChannelSecurity
from mig_tls.session import client_session, server_session

log = structlog.get_logger("mig.tls")

KEYS_FILE = "keys.psk"
DEFAULT_USERNAME = "qemu"
#: TLS 1.2 PSK suites with forward secrecy and authenticated encryption only
TLS12_CIPHERS = "ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-CHACHA20-POLY1305"
NATIVE_PSK = sys.version_info >= (3, 13)


#: held while a session adds its entry to sslpsk3's table, so that the entry it added is known
_TABLE_LOCK = threading.Lock()


class _PskObject(SSLPSKObject):
    """sslpsk3's object sets its callbacks (and, on a server, the accept state) at every ``do_handshake``;
    a memory-BIO session calls that once per round trip, so the callbacks are set once.

    sslpsk3 finds a session's context in a module-wide table (``psk_contexts``, keyed by OpenSSL's session
    address) that it never empties: every session would keep its credentials alive for the life of the
    process, ``object-del`` or not. OpenSSL asks for keys only during the handshake, so the entry goes when
    the handshake ends, or fails, or when the session is dropped in the middle of it (a cut connection).
    """

    #: one finalizer per table entry this session added; None until its callbacks are set
    _psk_entries: list[weakref.finalize] | None = None

    def do_handshake(self) -> None:
        if self._psk_entries is None:
            with _TABLE_LOCK:
                before = set(psk_contexts)
                self.context.setup_psk_callbacks(self)  # type: ignore[attr-defined]
                added = set(psk_contexts) - before
            # a dropped session: the callback runs before OpenSSL frees the session, so before its address
            # can be another session's key
            self._psk_entries = [weakref.finalize(self, psk_contexts.pop, key, None) for key in added]
        try:
            ssl.SSLObject.do_handshake(self)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # a memory-BIO round trip: the handshake goes on
        except BaseException:
            self._release_entries()
            raise
        self._release_entries()

    def _release_entries(self) -> None:
        """Pop this session's entries now (a finalizer runs once: not again when the session is dropped)."""
        for entry in self._psk_entries or ():
            entry()


def read_keys(path: str) -> dict[str, bytes]:
    """``username:hexkey`` lines (blank lines and ``#`` comments skipped); ValueError with the line."""
    keys: dict[str, bytes] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"Unable to access credentials {path}: {os.strerror(e.errno or errno.EIO)}") from None
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        user, colon, key = text.partition(":")
        try:
            value = bytes.fromhex(key)
        except ValueError:
            value = b""
        if not colon or not user or not value:
            raise ValueError(f"{path} line {n}: expected username:hexkey")
        keys[user] = value
    return keys


class PskCredentials(ChannelSecurity):
    """Pre-shared-key credentials for one endpoint; the key file is read at ``object-add``."""

    name = "tls-creds-psk"
    identity_kind = "PSK"  # tls-authz matches the username

    def __init__(self, creds_id: str, properties: Mapping[str, object]) -> None:
        super().__init__(creds_id, properties)
        if self.properties.get("priority"):
            raise ValueError("Property 'priority' is not supported: a GnuTLS priority string does not describe "
                             "mig's OpenSSL sessions")
        d = self.properties.get("dir")
        if d is None:
            raise ValueError("Missing 'dir' property value")
        path = os.path.join(str(d), KEYS_FILE)
        keys = read_keys(path)
        server = self.endpoint == "server"
        self.username = str(self.properties.get("username") or DEFAULT_USERNAME)
        if server:
            if self.properties.get("username"):
                raise ValueError("Property 'username' is for client credentials: a server looks the client's "
                                 "up in its keys file")
            self.keys = keys
        else:
            if self.username not in keys:
                raise ValueError(f"Username '{self.username}' not found in PSK file {path}")
            self.keys = {self.username: keys[self.username]}
        self._handshake = threading.local()  # the username the client presented, per handshaking thread
        ctx = sslpsk3.SSLPSKContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.sslobject_class = _PskObject
        ctx.options |= ssl.OP_NO_RENEGOTIATION  # keys are asked for in the first handshake only
        if NATIVE_PSK:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        else:
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(TLS12_CIPHERS)
        if server:
            ctx.set_psk_server_callback(self._server_key, None)
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the key is what proves the peer: no certificates
            ctx.set_psk_client_callback(lambda hint: (self.username, self.keys[self.username]))
        self.context = ctx
        log.info("tls_creds_loaded", id=creds_id, endpoint=self.endpoint, kind="psk", dir=str(d),
                 users=len(self.keys), tls="1.3" if NATIVE_PSK else "1.2")

    def _server_key(self, identity: str | None) -> bytes:
        self._handshake.identity = identity
        key = self.keys.get(identity or "")
        if key is None:
            log.warning("tls_psk_unknown_username", username=identity)
            return b""  # OpenSSL ends the handshake: unknown PSK identity
        return key

    def wrap_client(self, channel: Channel, hostname: str | None) -> Channel:
        return client_session(channel, self.context, None, describe_failure)

    def wrap_server(self, channel: Channel, authorize: Authorize | None) -> Channel:
        check: Callable[[bytes | None], None] | None = None
        if authorize is not None:
            def check(_certificate: bytes | None) -> None:
                identity = getattr(self._handshake, "identity", None)
                if not identity:
                    raise ChannelError("The client presented no PSK username")
                authorize(identity)
        return server_session(channel, self.context, describe_failure, check)


def describe_failure(e: ssl.SSLError) -> str:
    """An OpenSSL handshake failure under PSK, said plainly."""
    text = (e.reason or str(e)).lower().replace("_", " ")  # some alerts come without a reason code
    if any(k in text for k in ("bad record mac", "binder does not verify", "decrypt error")):
        return "TLS handshake failed: the pre-shared keys do not match"
    if any(k in text for k in ("psk identity not found", "unknown psk identity")):
        return "TLS handshake failed: the server has no pre-shared key for this username"
    if "alert" in text:
        return f"TLS handshake failed: the peer refused the session ({text})"
    return f"TLS handshake failed: {text}"
