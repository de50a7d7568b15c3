"""Authorization objects (QEMU's ``authz-simple`` and ``authz-list``): may this identity connect?

A TLS destination asks the object named by ``tls-authz`` about the distinguished name of the source's
certificate (RFC 4514, as ``CN=host,O=Org,C=GB``) at each handshake, so a list replaced or edited
between two migrations takes effect at the next one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mig_core.schema.objects import QAuthZListFormat, QAuthZListPolicy, QAuthZListRule


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """A glob as GLib's simple pattern match reads it: ``*`` any run, ``?`` one character, nothing else special."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)


class Authz:
    """Base of the authorization objects: ``is_allowed`` answers for one identity."""

    def is_allowed(self, identity: str) -> bool:
        raise NotImplementedError


@dataclass
class SimpleAuthz(Authz):
    """``authz-simple``: exactly one identity is allowed."""

    identity: str

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


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
