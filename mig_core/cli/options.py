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
