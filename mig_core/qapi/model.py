"""Building blocks for declaring QAPI types once, as typed Python classes.

Structs are msgspec Structs with kebab-case wire names; optional members default
to ``UNSET`` and are omitted on output. Scalars carry their QAPI type name in
``Annotated`` metadata so the input visitor can reproduce QEMU's checks and
error texts without any per-field code.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar

import msgspec
from msgspec import UNSET, UnsetType

__all__ = [
    "UNSET",
    "UnsetType",
    "QapiStruct",
    "QapiEnum",
    "FlatUnion",
    "Int",
    "Int64",
    "UInt8",
    "UInt16",
    "UInt32",
    "UInt64",
    "Size",
    "Number",
    "Str",
    "Bool",
    "StrOrNull",
    "Any_",
    "Unstable",
    "qapi_meta",
]


def qapi_meta(tp: str) -> msgspec.Meta:
    """Metadata naming the QAPI scalar type of an annotated member."""
    return msgspec.Meta(extra={"qapi": tp})


Int = Annotated[int, qapi_meta("int")]
Int64 = Annotated[int, qapi_meta("int64")]
UInt8 = Annotated[int, qapi_meta("uint8")]
UInt16 = Annotated[int, qapi_meta("uint16")]
UInt32 = Annotated[int, qapi_meta("uint32")]
UInt64 = Annotated[int, qapi_meta("uint64")]
Size = Annotated[int, qapi_meta("size")]
Number = Annotated[float, qapi_meta("number")]
Str = Annotated[str, qapi_meta("str")]
Bool = Annotated[bool, qapi_meta("bool")]
#: QAPI alternate of a JSON string or JSON null.
StrOrNull = Annotated[str | None, qapi_meta("StrOrNull")]
#: QAPI ``any``: passed through unchecked.
Any_ = Annotated[Any, qapi_meta("any")]

#: Marks a member as carrying the QAPI ``unstable`` feature.
Unstable = msgspec.Meta(extra={"features": ("unstable",)})


class QapiStruct(msgspec.Struct, kw_only=True, rename="kebab"):
    """Base of every QAPI struct: kebab-case names, optional members omitted when UNSET (``qapi.to_qmp``)."""


class QapiEnum(str, enum.Enum):
    """Base of every QAPI enum; members may carry features via ``__features__``."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def features_of(cls, value: str) -> tuple[str, ...]:
        feats: dict[str, tuple[str, ...]] = getattr(cls, "_qapi_features", {})
        return feats.get(value, ())


def enum_features(cls: type[QapiEnum], **features: tuple[str, ...]) -> type[QapiEnum]:
    """Attach per-member features (keyword = member value with '-' as '_')."""
    cls._qapi_features = {k.replace("_", "-"): v for k, v in features.items()}  # type: ignore[attr-defined]
    return cls


class FlatUnion:
    """A QAPI flat union: a discriminator member selects which branch's members sit beside it.

    Subclasses set ``discriminator`` (wire name), ``tag_type`` (the enum) and
    ``branches`` (tag value -> struct or nested union type).
    """

    discriminator: ClassVar[str]
    tag_type: ClassVar[type[QapiEnum]]
    branches: ClassVar[dict[str, type]]

    __slots__ = ("tag", "value")
    tag: QapiEnum
    #: the branch's struct (or nested union): its type follows the tag, which the checker cannot see
    value: Any

    def __init__(self, tag: QapiEnum | str, value: Any) -> None:
        self.tag = self.tag_type(tag)
        expected = self.branches[self.tag.value]
        if not isinstance(value, expected):
            raise TypeError(f"{type(self).__name__} branch {self.tag.value!r} needs {expected.__name__}")
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and (self.tag, self.value) == (other.tag, other.value)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.tag, self.value))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tag.value!r}, {self.value!r})"
