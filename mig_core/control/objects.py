"""User-created objects (``object-add`` / ``object-del``, ``mig run --object``): TLS credentials and authz.

Ids follow QEMU's rules (a letter, then letters, digits, ``-``, ``.``, ``_``) and its texts for a
duplicate, a missing or an in-use object. TLS credentials come from the channel-security plugin that
registers their QOM type and are loaded when added; authorization objects are mig's own. A running
migration's credentials cannot be deleted under it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import structlog

from mig_core.errors import PluginNotFound, QMPError
from mig_core.ext import channel_security
from mig_core.ext.authz import Authz, AuthzCheck, ListAuthz, SimpleAuthz
from mig_core.ext.channel_security import Authorize, ChannelSecurity
from mig_core.plugin.registry import PluginRegistry
from mig_core.qapi import UNSET, to_qmp
from mig_core.schema.objects import (
    AuthZListProperties,
    AuthZSimpleProperties,
    ObjectBase,
    ObjectOptions,
    QAuthZListPolicy,
)

log = structlog.get_logger("mig.objects")

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


class ObjectRegistry:
    """The objects of one host, by id."""

    def __init__(self, registry: PluginRegistry, in_use: Callable[[], set[str]] = set) -> None:
        self.registry = registry
        #: the ids running migrations hold (object-del refuses them)
        self.in_use = in_use
        self._objects: dict[str, ChannelSecurity | Authz] = {}
        self._lock = threading.Lock()

    def add(self, options: ObjectOptions) -> None:
        """Create an object; QMPError with QEMU's text if the id is bad or taken or the object cannot load."""
        props = options.value
        assert isinstance(props, ObjectBase)
        oid = props.id
        if not _ID.match(oid):
            raise QMPError("Parameter 'id' expects an identifier")
        with self._lock:  # (object-add is rare: loading credentials under the lock costs nobody)
            if oid in self._objects:
                raise QMPError(f"attempt to add duplicate property '{oid}' to object (type 'container')")
            self._objects[oid] = self._create(options.tag.value, oid, props)
        log.info("object_added", id=oid, qom_type=options.tag.value)

    def _create(self, qom_type: str, oid: str, props: Any) -> ChannelSecurity | Authz:
        if isinstance(props, AuthZSimpleProperties):
            return SimpleAuthz(props.identity)
        if isinstance(props, AuthZListProperties):
            return ListAuthz(QAuthZListPolicy.DENY if props.policy is UNSET else props.policy,
                             [] if props.rules is UNSET else list(props.rules))
        try:
            cls = channel_security.load(self.registry, qom_type)
        except PluginNotFound as e:
            raise QMPError(str(e)) from None
        wire = {k: v for k, v in to_qmp(props).items() if k != "id"}
        try:
            return cls(oid, wire)
        except ValueError as e:
            raise QMPError(str(e)) from None

    def delete(self, oid: str) -> None:
        with self._lock:
            if oid not in self._objects:
                raise QMPError(f"object '{oid}' not found")
            if oid in self.in_use():
                raise QMPError(f"object '{oid}' is in use, can not be deleted")
            del self._objects[oid]
        log.info("object_deleted", id=oid)

    def tls_creds(self, oid: str, endpoint: str) -> ChannelSecurity:
        """The credentials named by ``tls-creds``, for ``endpoint``; QEMU's texts otherwise."""
        with self._lock:
            obj = self._objects.get(oid)
        if obj is None:
            raise QMPError(f"No TLS credentials with id '{oid}'")
        if not isinstance(obj, ChannelSecurity):
            raise QMPError(f"Object with id '{oid}' is not TLS credentials")
        if obj.endpoint != endpoint:
            raise QMPError(f"Expected TLS credentials for a {endpoint} endpoint")
        return obj

    def authz(self, oid: str) -> Authz:
        with self._lock:
            obj = self._objects.get(oid)
        if obj is None:
            raise QMPError(f"Cannot find QAuthZ object ID {oid}")
        if not isinstance(obj, Authz):
            raise QMPError(f"Object '{oid}' is not a QAuthZ subclass")
        return obj

    def authz_check(self, oid: str, kind: str = "x509") -> AuthzCheck:
        """``tls-authz`` ``oid`` as it stands now, a check another process can run (see ``AuthzCheck``).
        ``kind`` names what the identity is in a refusal (QEMU: ``x509`` or ``PSK``)."""
        try:
            return AuthzCheck(oid, kind, self.authz(oid).describe())
        except QMPError as e:
            return AuthzCheck(oid, kind, error=e.desc)

    def authorizer(self, oid: str, kind: str = "x509") -> Authorize:
        """A check the TLS server runs at each handshake: the object is looked up then, as QEMU does."""
        def authorize(identity: str) -> None:
            self.authz_check(oid, kind)(identity)
        return authorize
