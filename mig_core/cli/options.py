"""Command-line forms shared by mig demo and mig migrate: --cap NAME=on|off, --param NAME=VALUE."""

from __future__ import annotations

import json
from typing import Any

import click

from mig_core.schema.migration import MigrationCapability
from mig_core.schema.parameters import SPECS

_BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def parse_caps(values: tuple[str, ...]) -> list[dict[str, Any]]:
    out = []
    known = {c.value for c in MigrationCapability}
    for v in values:
        name, eq, state = v.partition("=")
        if name not in known:
            raise click.BadParameter(f"unknown capability '{name}'", param_hint="--cap")
        if eq and state.lower() not in _BOOL:
            raise click.BadParameter(f"'{v}': the state must be on or off", param_hint="--cap")
        out.append({"capability": name, "state": _BOOL[state.lower()] if eq else True})
    return out


def parse_value(text: str) -> Any:
    """on/off → bool, integers (with K/M/G) → int, JSON lists/objects/null → as JSON, else the string."""
    from mig_core.machine.reference_host import parse_size

    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]  # a quoted string stays a string
    low = text.lower()
    if low in _BOOL:
        return _BOOL[low]
    if text[:1] in "[{" or text == "null":
        return json.loads(text)
    try:
        return parse_size(text)
    except ValueError:
        return text


def parse_params(values: tuple[str, ...]) -> dict[str, Any]:
    out = {}
    for v in values:
        name, eq, value = v.partition("=")
        if not eq:
            raise click.BadParameter(f"'{v}' is not NAME=VALUE", param_hint="--param")
        if name not in SPECS:
            raise click.BadParameter(f"unknown parameter '{name}'", param_hint="--param")
        out[name] = value if SPECS[name].qapi_type in ("str", "StrOrNull") else parse_value(value)
    return out


def parse_object(text: str) -> dict[str, Any]:
    """``--object`` as QEMU's ``-object``: ``TYPE,id=ID[,PROP=VALUE…]`` (``,,`` is a comma) or a JSON object.

    Boolean properties take on/off/yes/no/true/false; anything structured (authz-list's ``rules``) needs
    the JSON form.
    """
    from mig_core.qapi.visitor import members_of
    from mig_core.schema.objects import ObjectOptions

    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise click.BadParameter(f"not a JSON object: {e}", param_hint="--object") from None
        if not isinstance(data, dict):
            raise click.BadParameter("not a JSON object", param_hint="--object")
        return data
    parts = [p.replace("\0", ",") for p in text.replace(",,", "\0").split(",")]
    out: dict[str, Any] = {}
    if parts and "=" not in parts[0]:
        out["qom-type"] = parts.pop(0)
    for p in parts:
        key, eq, value = p.partition("=")
        if not eq:
            raise click.BadParameter(f"'{p}' is not PROP=VALUE", param_hint="--object")
        out[key] = value
    branch = ObjectOptions.branches.get(str(out.get("qom-type")))
    kinds = {m.name: m.node.kind for m in members_of(branch)} if branch is not None else {}
    for key, value in out.items():
        if kinds.get(key) == "bool":
            if value.lower() not in _BOOL:
                raise click.BadParameter(f"'{key}={value}': a boolean is on or off", param_hint="--object")
            out[key] = _BOOL[value.lower()]
    return out
