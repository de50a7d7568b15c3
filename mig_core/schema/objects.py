"""QMP structs of ``object-add`` / ``object-del`` for the object types mig has (QEMU's qom.json).

mig creates TLS credentials and authorization objects only; ``qom-type`` names one of them, and every
other QEMU object type is refused by the enum, with QEMU's text for a value it does not accept.
"""

from __future__ import annotations

from mig_core.qapi import UNSET, Bool, FlatUnion, QapiEnum, QapiStruct, Str, UnsetType


class ObjectType(QapiEnum):
    AUTHZ_LIST = "authz-list"
    AUTHZ_SIMPLE = "authz-simple"
    TLS_CREDS_PSK = "tls-creds-psk"
    TLS_CREDS_X509 = "tls-creds-x509"


class QCryptoTLSCredsEndpoint(QapiEnum):
    CLIENT = "client"
    SERVER = "server"


class QAuthZListPolicy(QapiEnum):
    DENY = "deny"
    ALLOW = "allow"


class QAuthZListFormat(QapiEnum):
    EXACT = "exact"
    GLOB = "glob"


class QAuthZListRule(QapiStruct):
    """One rule: ``match`` against the identity, exactly or as a glob; the first that matches decides."""

    match: Str
    policy: QAuthZListPolicy
    format: QAuthZListFormat | UnsetType = UNSET


class ObjectBase(QapiStruct):
    id: Str


class TlsCredsProperties(ObjectBase):
    verify_peer: Bool | UnsetType = UNSET
    dir: Str | UnsetType = UNSET
    endpoint: QCryptoTLSCredsEndpoint | UnsetType = UNSET
    priority: Str | UnsetType = UNSET


class TlsCredsX509Properties(TlsCredsProperties):
    sanity_check: Bool | UnsetType = UNSET
    passwordid: Str | UnsetType = UNSET


class TlsCredsPskProperties(TlsCredsProperties):
    username: Str | UnsetType = UNSET


class AuthZListProperties(ObjectBase):
    policy: QAuthZListPolicy | UnsetType = UNSET
    rules: list[QAuthZListRule] | UnsetType = UNSET


class AuthZSimpleProperties(ObjectBase):
    identity: Str


class ObjectOptions(FlatUnion):
    """``object-add``'s arguments: ``qom-type`` selects the properties beside ``id``."""

    discriminator = "qom-type"
    tag_type = ObjectType
    branches = {
        "authz-list": AuthZListProperties,
        "authz-simple": AuthZSimpleProperties,
        "tls-creds-psk": TlsCredsPskProperties,
        "tls-creds-x509": TlsCredsX509Properties,
    }


class ObjectDelArgs(QapiStruct):
    id: Str
