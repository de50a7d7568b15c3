"""No input a client can send makes the host answer ``internal error``: every command of the schema,
called with every member set to awkward values of its declared type (and of other types), over a real
socket to a real ``mig run``. An internal error is a bug to fix where it arises, not here."""

from __future__ import annotations

from typing import Any

import pytest

from mig_core.qapi import FlatUnion
from mig_core.qapi.visitor import Node, members_of
from mig_core.schema.commands import COMMANDS
from mig_core.testing import Host, RawQMP, wait_until

#: Commands left out: ``quit`` ends the host (it has its own tests).
SKIP = {"quit"}

INTS = [4096, 0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64 - 1]


def candidates(node: Node, tmp: str, depth: int = 0) -> list[Any]:
    """Values of a member's declared type worth trying, first the most ordinary one."""
    kind = node.kind
    if kind in ("int", "int64", "uint8", "uint16", "uint32", "uint64", "size"):
        return INTS
    if kind == "number":
        return [0.0, -1.5, 1e308]
    if kind == "str":
        return [f"{tmp}/out", "", "/dev/full", "\x01", "\u00fc", "a" * 300, f"{tmp}/no/such/dir/x"]
    if kind == "bool":
        return [True, False]
    if kind == "StrOrNull":
        return ["", None, "x"]
    if kind == "any":
        return [None, {}, [1]]
    if kind == "enum":
        return [m.value for m in node.py]
    if kind == "list":
        if depth > 2:
            return [[]]
        inner = candidates(node.py, tmp, depth + 1)
        return [[], *[[v] for v in inner], inner[:2] * 2]
    if kind == "struct":
        return [obj for obj in struct_values(node.py, tmp, depth + 1)][:12] if depth <= 2 else [{}]
    if kind == "union":
        return union_values(node.py, tmp, depth + 1) if depth <= 2 else [{}]
    raise AssertionError(f"no candidates for {kind}")


def struct_values(cls: type, tmp: str, depth: int = 0) -> list[dict[str, Any]]:
    """A struct with its required members at their first candidate, then one member varied at a time."""
    members = members_of(cls)
    base = {m.name: candidates(m.node, tmp, depth)[0] for m in members if not m.optional}
    out = [base]
    for m in members:
        for v in candidates(m.node, tmp, depth):
            out.append({**base, m.name: v})
    return out


def union_values(cls: type[FlatUnion], tmp: str, depth: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tag, branch in cls.branches.items():
        inner = (union_values(branch, tmp, depth) if issubclass(branch, FlatUnion)  # a union inside a union
                 else struct_values(branch, tmp, depth))
        for obj in inner[:8]:
            out.append({cls.discriminator: tag, **obj})
    return out


def argument_sets(cmd: Any, tmp: str) -> list[dict[str, Any]]:
    if cmd.args is None:
        return [{}, {"bogus": 1}]
    if issubclass(cmd.args, FlatUnion):
        sets = union_values(cmd.args, tmp, 0)
    else:
        sets = struct_values(cmd.args, tmp)
    # and each member with a value of the wrong JSON type
    extra = []
    if not issubclass(cmd.args, FlatUnion):
        for m in members_of(cmd.args):
            for wrong in (None, "s", 1, [], {}):
                extra.append({**sets[0], m.name: wrong})
    return sets + extra


def test_argument_sets_cover_every_declared_member(tmp_path):
    """The generator itself: every member of every command is varied (a test that could not fail otherwise)."""
    for cmd in COMMANDS.values():
        if cmd.args is None or issubclass(cmd.args, FlatUnion):
            continue
        names = set().union(*(s.keys() for s in argument_sets(cmd, str(tmp_path))))
        assert {m.name for m in members_of(cmd.args)} <= names, cmd.name


@pytest.mark.parametrize("runstate", ["running", "incoming"])
def test_no_command_answers_internal_error(tmp_path, runstate):
    args = ("--ram", "8M") if runstate == "running" else ("--ram", "8M", "--incoming", "defer")
    host = Host(tmp_path, *args, name="audit", cwd=tmp_path)
    try:
        c = RawQMP(host.sock)
        c.sock.settimeout(60)
        c.negotiate()
        internal = []
        sent = 0
        for name, cmd in sorted(COMMANDS.items()):
            if name in SKIP or name == "qmp_capabilities":
                continue
            for arguments in argument_sets(cmd, str(tmp_path)):
                reply = c.cmd({"execute": name, "arguments": arguments, "id": sent})
                sent += 1
                assert reply.get("id") == sent - 1, reply
                desc = reply.get("error", {}).get("desc", "")
                if "internal error" in desc:
                    internal.append((name, arguments, desc))
                if name == "migrate" and "return" in reply:
                    # each migration that started ends (cancelled, or failed on its own) before the next,
                    # and the way it ended is checked too
                    c.cmd({"execute": "migrate_cancel"})
                    info = wait_until(lambda: (i := c.cmd({"execute": "query-migrate"})["return"]).get("status")
                                      in ("cancelled", "failed", "completed") and i, timeout=60)
                    if "internal error" in info.get("error-desc", ""):
                        internal.append((name, arguments, info["error-desc"]))
        assert sent > 500
        assert internal == [], internal[:10]
        assert c.cmd({"execute": "query-status"})["return"]["status"]
        crashed = [e for e in host.log_events() if e.get("event") in ("qmp_command_crashed",
                                                                        "migration_thread_crashed",
                                                                        "incoming_thread_crashed")]
        assert crashed == [], crashed[:5]
        c.close()
    finally:
        host.stop()
