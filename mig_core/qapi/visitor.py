"""Convert between QMP JSON and the typed QAPI classes.

Input follows QEMU's QObject input visitor: members are visited in declaration
order, unexpected keys are reported after the struct's own members, and every
error carries QEMU's exact wording (``Parameter 'x' expects uint8_t``,
``Invalid parameter type for 'y', expected: boolean`` ...). Output is msgspec's
encoder with flat unions flattened.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Union, get_args, get_origin

import msgspec
from msgspec import UNSET, UnsetType

from mig_core.qapi.model import FlatUnion, QapiEnum

__all__ = ["QapiInputError", "from_qmp", "to_qmp", "type_node", "Node"]

_UINT_MAX = {"uint8": (1 << 8) - 1, "uint16": (1 << 16) - 1, "uint32": (1 << 32) - 1}
_C_NAME = {"uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t"}
_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT64_MAX = (1 << 64) - 1


class QapiInputError(ValueError):
    """Input that does not match the declared QAPI type; str() is QEMU's message."""


# ---------------------------------------------------------------------------
# type plan: what each annotation means, computed once per class


@dataclass(frozen=True)
class Node:
    kind: str  # scalar name, "enum", "list", "struct", "union"
    py: Any = None  # enum / struct / union class, or element Node for lists
    features: tuple[str, ...] = ()


@dataclass(frozen=True)
class Member:
    name: str  # wire name
    attr: str  # Python attribute
    node: Node
    optional: bool


def _meta_of(args: tuple[Any, ...]) -> tuple[str | None, tuple[str, ...]]:
    qapi, feats = None, ()
    for meta in args:
        extra = getattr(meta, "extra", None) or {}
        qapi = extra.get("qapi", qapi)
        feats = feats + tuple(extra.get("features", ()))
    return qapi, feats


def type_node(tp: Any) -> tuple[Node, bool]:
    """Return the node for an annotation and whether it is optional (may be UNSET)."""
    optional = False
    feats: tuple[str, ...] = ()
    qapi = None
    if get_origin(tp) is typing.Annotated:
        base, *meta = get_args(tp)
        qapi, feats = _meta_of(tuple(meta))
        tp = base
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not UnsetType]
        optional = len(args) != len(get_args(tp))
        if len(args) == 1:
            inner, _ = type_node(args[0])
            return Node(inner.kind, inner.py, inner.features + feats), optional
        if qapi is None:
            raise TypeError(f"unsupported union annotation {tp!r}")
    if qapi is not None:
        return Node(qapi, None, feats), optional
    if origin is list:
        (elem,) = get_args(tp)
        return Node("list", type_node(elem)[0], feats), optional
    if isinstance(tp, type) and issubclass(tp, QapiEnum):
        return Node("enum", tp, feats), optional
    if isinstance(tp, type) and issubclass(tp, FlatUnion):
        return Node("union", tp, feats), optional
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return Node("struct", tp, feats), optional
    raise TypeError(f"unsupported QAPI annotation {tp!r}")


def members_of(cls: Any) -> tuple[Member, ...]:
    """The declared members of a struct, in declaration order."""
    return _members_of(cls)


@functools.cache
def _members_of(cls: Any) -> tuple[Member, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in msgspec.structs.fields(cls):
        node, optional = type_node(hints[f.name])
        out.append(Member(f.encode_name, f.name, node, optional))
    return tuple(out)


# ---------------------------------------------------------------------------
# input


def _type_error(full: str, expected: str) -> QapiInputError:
    return QapiInputError(f"Invalid parameter type for '{full}', expected: {expected}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scalar(kind: str, v: Any, full: str, bare: str) -> Any:
    if kind in ("int", "int64"):
        if not _is_int(v) or not _INT64[0] <= v <= _INT64[1]:
            raise _type_error(full, "integer")
        return v
    if kind in ("uint64", "size", "uint8", "uint16", "uint32"):
        # QEMU parses integers beyond uint64 as doubles, which no unsigned member accepts;
        # negative values wrap modulo 2^64 for backward compatibility.
        if not _is_int(v) or not _INT64[0] <= v <= _UINT64_MAX:
            raise QapiInputError(f"Parameter '{full}' expects uint64")
        v &= _UINT64_MAX
        if kind in _UINT_MAX and v > _UINT_MAX[kind]:
            raise QapiInputError(f"Parameter '{bare}' expects {_C_NAME[kind]}")
        return v
    if kind == "number":
        if not (_is_int(v) or isinstance(v, float)):
            raise _type_error(full, "number")
        return float(v)
    if kind == "str":
        if not isinstance(v, str):
            raise _type_error(full, "string")
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise _type_error(full, "boolean")
        return v
    if kind == "StrOrNull":
        if v is not None and not isinstance(v, str):
            raise _type_error(bare, "StrOrNull")
        return v
    if kind == "any":
        return v
    raise TypeError(f"unknown QAPI scalar {kind!r}")


def _visit(node: Node, v: Any, full: str, bare: str) -> Any:
    if node.kind == "list":
        if not isinstance(v, list):
            raise _type_error(full, "array")
        return [_visit(node.py, e, f"{full}[{i}]", "null") for i, e in enumerate(v)]
    if node.kind == "enum":
        if not isinstance(v, str):
            raise _type_error(full, "string")
        try:
            return node.py(v)
        except ValueError:
            raise QapiInputError(f"Parameter '{bare}' does not accept value '{v}'") from None
    if node.kind in ("struct", "union"):
        if not isinstance(v, dict):
            raise _type_error(full, "object")
        consumed: set[str] = set()
        out = _visit_members(node.py, v, full, consumed)
        _check_unexpected(v, consumed, full)
        return out
    return _scalar(node.kind, v, full, bare)


def _child(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _visit_members(cls: type, d: dict[str, Any], prefix: str, consumed: set[str]) -> Any:
    if issubclass(cls, FlatUnion):
        key = cls.discriminator
        full = _child(prefix, key)
        if key not in d:
            raise QapiInputError(f"Parameter '{full}' is missing")
        consumed.add(key)
        tag = _visit(Node("enum", cls.tag_type), d[key], full, key)
        branch = cls.branches[tag.value]
        return cls(tag, _visit_members(branch, d, prefix, consumed))
    kwargs = {}
    for m in members_of(cls):
        full = _child(prefix, m.name)
        if m.name not in d:
            if not m.optional:
                raise QapiInputError(f"Parameter '{full}' is missing")
            continue
        consumed.add(m.name)
        kwargs[m.attr] = _visit(m.node, d[m.name], full, m.name)
    return cls(**kwargs)


def _check_unexpected(d: dict[str, Any], consumed: set[str], prefix: str) -> None:
    for key in d:
        if key not in consumed:
            raise QapiInputError(f"Parameter '{_child(prefix, key)}' is unexpected")


def from_qmp(cls: type, data: Any, *, name: str = "") -> Any:
    """Build an instance of a struct or union class from QMP JSON, as QEMU's visitor would."""
    return _visit(Node("union" if issubclass(cls, FlatUnion) else "struct", cls), data, name, name or "null")


def visit_node(node: Node, data: Any, name: str) -> Any:
    """Visit one value of a given node type (used for single command arguments)."""
    return _visit(node, data, name, name)


# ---------------------------------------------------------------------------
# output


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, FlatUnion):
        out = {obj.discriminator: obj.tag.value}
        out.update(msgspec.to_builtins(obj.value, enc_hook=_enc_hook))
        return out
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def to_qmp(obj: Any) -> Any:
    """Encode a QAPI value (struct, union, list, enum, scalar) as plain JSON data."""
    if isinstance(obj, FlatUnion):
        return _enc_hook(obj)
    return msgspec.to_builtins(obj, enc_hook=_enc_hook)


def is_unset(v: Any) -> bool:
    return v is UNSET
