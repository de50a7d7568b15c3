"""Helpers for COLO tests between ``mig run`` hosts with ``--output``: start a pair in COLO, wait for
checkpoints and events, and check that the released messages of both sides are one sequence."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from mig_core.testing import Host, connect, wait_for_status

WORKLOAD = ("--ram", "32M", "--ram-fill", "random", "--vcpus", "2", "--dirty-rate", "8M")


def released(*paths: str | Path) -> dict[int, str]:
    """Every released message by number; a number released twice must carry the same hash."""
    seen: dict[int, str] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f.read().splitlines():
                seq_text, digest = line.split()
                seq = int(seq_text)
                assert seen.setdefault(seq, digest) == digest, f"message {seq} released with two contents"
    return seen


def assert_one_sequence(seen: dict[int, str], chained: bool) -> None:
    """Numbers 1..n with none missing; ``chained``: each hash follows from the one before it."""
    assert seen, "nothing was released"
    assert sorted(seen) == list(range(1, max(seen) + 1)), "a released message is missing"
    if chained:
        digest = b"\0" * 16
        for seq in range(1, max(seen) + 1):
            digest = hashlib.blake2b(digest + seq.to_bytes(8, "little"), digest_size=16).digest()
            assert seen[seq] == digest.hex(), f"message {seq} does not follow from the state before it"


#: Tests that do not test the heartbeat give a busy machine's hosts time: a silence this long is a hang.
#: (A killed peer is seen at once, whatever the timeout: its connection breaks.)
PATIENT = {"x-colo-heartbeat-timeout": 5000}


async def colo_pair(start_host: Callable[..., Host], tmp_path: Path, diverge: float = 0.0, delay: int = 300,
                    rate: int = 200, params: dict[str, Any] | None = None) -> tuple[Host, Host, QMPClient, QMPClient]:
    """A primary (``src``) and a secondary (``dst``) in COLO, each with ``mig run --output`` into ``p.out`` and
    ``s.out`` under ``tmp_path``; ``params`` on both (after PATIENT)."""
    out = f"rate={rate},diverge={diverge}"
    src_h = start_host(*WORKLOAD, "--output", f"{tmp_path}/p.out,{out}", name="src")
    dst_h = start_host(*WORKLOAD, "--output", f"{tmp_path}/s.out,{out}", "--incoming", "defer", name="dst")
    src, dst = await connect(src_h.sock, "src"), await connect(dst_h.sock, "dst")
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": x, "state": True}
                                                                      for x in ("x-colo", "events")]})
        await c.execute("migrate-set-parameters", {"x-checkpoint-delay": delay, **PATIENT, **(params or {})})
    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/colo.sock"})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/colo.sock"})
    await wait_for_status(src, {"colo"}, timeout=60)
    await wait_for_status(dst, {"colo"}, timeout=60)
    return src_h, dst_h, src, dst


async def checkpoints(client: QMPClient, at_least: int, timeout: float = 60) -> dict[str, Any]:
    """Wait until the primary made ``at_least`` checkpoints; its stats then."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats: dict[str, Any] = await client.execute("x-query-colo-stats")  # type: ignore[assignment]
        if stats["checkpoints"] >= at_least:
            return stats
        assert asyncio.get_running_loop().time() < deadline, f"only {stats['checkpoints']} checkpoints: {stats}"
        await asyncio.sleep(0.05)


async def disconnect(*clients: QMPClient) -> None:
    """Disconnect, whatever state the clients (or their hosts) are in."""
    for c in clients:
        with contextlib.suppress(Exception):
            await c.disconnect()


async def wait_event(client: QMPClient, name: str, timeout: float = 30) -> dict[str, Any]:
    """The next event ``name`` the client receives (events since it connected included)."""

    async def seen() -> dict[str, Any]:
        async for ev in client.events:
            if ev["event"] == name:
                return dict(ev)
        raise AssertionError(f"the event stream ended before {name}")
    return await asyncio.wait_for(seen(), timeout)


async def status_after_failover(client: QMPClient, timeout: float = 10.0) -> dict[str, Any]:
    """query-colo-status once the failover has finished. The failover, like QEMU's, marks the migration
    completed first and its own state completed after releasing what was held, so for a moment after
    `completed` the status still shows the failover under way (CI under load saw reason "error" there)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status: dict[str, Any] = await client.execute("query-colo-status")  # type: ignore[assignment]
        if status["last-mode"] != "none" or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.02)
