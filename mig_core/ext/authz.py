"""Authorization objects (QEMU's ``authz-simple`` and ``authz-list``): may this identity connect?

A TLS destination asks the object named by ``tls-authz`` about the distinguished name of the source's
certificate (RFC 4514, as ``CN=host,O=Org,C=GB``) at each handshake, so a list replaced or edited
between two migrations takes effect at the next one.

A check may run in another process (the TLS relay, the postcopy page server): ``AuthzCheck`` is the
object as it was when the connection was handed over, plain data that crosses a control socket.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from mig_core.errors import ChannelError
from mig_core.schema.objects import QAuthZListFormat, QAuthZListPolicy, QAuthZListRule

log = structlog.get_logger("mig.objects")


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """A glob as GLib's simple pattern match reads it: ``*`` any run, ``?`` one character, nothing else special."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


class Authz:
    """Base of the authorization objects: ``is_allowed`` answers for one identity."""

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The object as plain data (``from_description`` rebuilds it in another process)."""
        raise NotImplementedError


@dataclass
class SimpleAuthz(Authz):
    """``authz-simple``: exactly one identity is allowed."""

    identity: str

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity

    def describe(self) -> dict[str, Any]:
        return {"qom-type": "authz-simple", "identity": self.identity}


@dataclass
class ListAuthz(Authz):
    """``authz-list``: the first rule whose pattern matches decides; none matching, ``policy`` does."""

    policy: QAuthZListPolicy
    rules: Sequence[QAuthZListRule]

    def is_allowed(self, identity: str) -> bool:
        for rule in self.rules:
            if rule.format is QAuthZListFormat.GLOB:
                hit = _glob(rule.match).fullmatch(identity) is not None
            else:
                hit = identity == rule.match
            if hit:
                return rule.policy is QAuthZListPolicy.ALLOW
        return self.policy is QAuthZListPolicy.ALLOW

    def describe(self) -> dict[str, Any]:
        return {"qom-type": "authz-list", "policy": self.policy.value,
                "rules": [[r.match, r.policy.value, r.format is QAuthZListFormat.GLOB] for r in self.rules]}


def from_description(d: Mapping[str, Any]) -> Authz:
    """The object ``Authz.describe`` gave."""
    if d["qom-type"] == "authz-simple":
        return SimpleAuthz(str(d["identity"]))
    return ListAuthz(QAuthZListPolicy(d["policy"]),
                     [QAuthZListRule(match=str(m), policy=QAuthZListPolicy(p),
                                     format=QAuthZListFormat.GLOB if glob else QAuthZListFormat.EXACT)
                      for m, p, glob in d["rules"]])


@dataclass(frozen=True)
class AuthzCheck:
    """``tls-authz`` as it stood when a connection arrived: the object's description, or why there is none
    (``error``: QEMU's text for a missing object). ``kind`` names the identity in a refusal (x509, PSK)."""

    oid: str
    kind: str
    description: Mapping[str, Any] | None = None
    error: str | None = None

    def __call__(self, identity: str) -> None:
        """Pass if ``identity`` may connect; ``ChannelError`` with QEMU's text if not."""
        if self.description is None:
            raise ChannelError(self.error or f"Cannot find QAuthZ object ID {self.oid}")
        if not from_description(self.description).is_allowed(identity):
            log.warning("tls_authz_denied", authz=self.oid, identity=identity)
            raise ChannelError(f"TLS {self.kind} authz check for {identity} is denied")

    def to_wire(self) -> dict[str, Any]:
        return {"oid": self.oid, "kind": self.kind, "description": self.description, "error": self.error}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> AuthzCheck:
        return cls(str(d["oid"]), str(d["kind"]), d.get("description"), d.get("error"))
