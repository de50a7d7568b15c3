"""Declarative QAPI typing: scalars, structs, enums, flat unions and the QMP visitor."""

from mig_core.qapi.model import (
    UNSET,
    Any_,
    Bool,
    FlatUnion,
    Int,
    Int64,
    Number,
    QapiEnum,
    QapiStruct,
    Size,
    Str,
    StrOrNull,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    UnsetType,
    Unstable,
    enum_features,
)
from mig_core.qapi.visitor import QapiInputError, from_qmp, members_of, to_qmp

__all__ = [
    "UNSET", "Any_", "Bool", "FlatUnion", "Int", "Int64", "Number", "QapiEnum", "QapiStruct",
    "Size", "Str", "StrOrNull", "UInt8", "UInt16", "UInt32", "UInt64", "Unstable", "UnsetType",
    "enum_features", "QapiInputError", "from_qmp", "members_of", "to_qmp",
]
