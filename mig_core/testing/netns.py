"""Two hosts on a link of their own: network namespaces joined by a veth pair, whose link a test can cut.

``VethLink`` makes namespaces ``<name>-a`` and ``<name>-b`` (root only), gives them 10.77.0.1/24 and
10.77.0.2/24 on the two ends of a veth pair, and ``prefix(side)`` is the command prefix that runs a process
inside one of them (``Host(..., wrapper=link.prefix("a"))``). ``down()``/``up()`` take the link away and
give it back as a pulled cable does: packets in flight are lost, connections live on until their own
timeouts say otherwise. Nothing leaves the namespaces: they have no route but the link between them.
"""

from __future__ import annotations

import itertools
import os
import subprocess

ADDRESSES = {"a": "10.77.0.1", "b": "10.77.0.2"}
_names = itertools.count()


class NetnsUnavailable(RuntimeError):
    """This process may not create network namespaces (not root, or no ``ip`` command)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {done.stderr.strip()}")


class VethLink:
    """Namespaces ``<name>-a`` and ``<name>-b`` joined by one veth pair; delete with ``close()``."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"mig{os.getpid()}x{next(_names)}"
        self.namespaces = {side: f"{self.name}-{side}" for side in ADDRESSES}
        self._made: list[str] = []
        try:
            for ns in self.namespaces.values():
                _ip("netns", "add", ns)
                self._made.append(ns)
            a, b = self.namespaces["a"], self.namespaces["b"]
            _ip("link", "add", "veth-a", "netns", a, "type", "veth", "peer", "name", "veth-b", "netns", b)
            for side, ns in self.namespaces.items():
                _ip("-n", ns, "addr", "add", f"{ADDRESSES[side]}/24", "dev", f"veth-{side}")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", f"veth-{side}", "up")
        except (NetnsUnavailable, FileNotFoundError) as e:
            self.close()
            raise NetnsUnavailable(str(e)) from None

    def prefix(self, side: str) -> list[str]:
        """The command prefix that runs a program inside namespace ``side`` ("a" or "b")."""
        return ["ip", "netns", "exec", self.namespaces[side]]

    def address(self, side: str) -> str:
        return ADDRESSES[side]

    def down(self) -> None:
        """Take the link down on side a (the peer loses its carrier too): nothing crosses until ``up()``."""
        _ip("-n", self.namespaces["a"], "link", "set", "veth-a", "down")

    def up(self) -> None:
        _ip("-n", self.namespaces["a"], "link", "set", "veth-a", "up")

    def close(self) -> None:
        """Delete the namespaces (the veth pair goes with them); processes inside should be gone first."""
        for ns in self._made:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
        self._made = []

    def __enter__(self) -> VethLink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
