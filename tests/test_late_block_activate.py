"""Storage handover on shared storage: the source holds its node's write lock until the switchover, an
incoming host opens the same file without it, and takes it at the end of the migration or, with
``late-block-activate`` on a host that stays paused, only at ``cont``. Another process probes the lock."""

from __future__ import annotations

import fcntl

from mig_core.testing import connect, qmp_error, wait_for_status

WL = ("--ram", "4M", "--ram-fill", "half")


def locked_elsewhere(path) -> bool:
    """Does some other process hold a write lock on ``path``? (a POSIX lock conflicts with mig's OFD lock)"""
    with open(path, "r+b") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.lockf(f, fcntl.LOCK_UN)
        return False


async def handover(start_host, tmp_path, late: bool):
    img = tmp_path / "shared.img"
    s = start_host(*WL, f"--drive=node-name=disk0,file={img},size=1M", name="src")
    assert locked_elsewhere(img)  # the running source holds it
    d = start_host(*WL, f"--drive=node-name=disk0,file={img},size=1M", "--incoming", "defer", "-S", name="dst")
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    if late:
        await dst.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "late-block-activate", "state": True}]})
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    (addr,) = (await dst.execute("query-migrate"))["socket-address"]
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{addr['port']}"})
    assert (await wait_for_status(src, {"completed", "failed"}, timeout=60))["status"] == "completed"
    assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    assert (await dst.execute("query-status"))["status"] == "paused"
    return img, src, dst


async def test_the_destination_takes_the_lock_at_the_end_of_the_migration(start_host, tmp_path):
    img, src, dst = await handover(start_host, tmp_path, late=False)
    try:
        assert locked_elsewhere(img)  # the destination's now, although it stays paused
    finally:
        await src.disconnect()
        await dst.disconnect()


async def test_late_block_activate_takes_it_at_cont(start_host, tmp_path):
    img, src, dst = await handover(start_host, tmp_path, late=True)
    try:
        assert not locked_elsewhere(img)  # the source let go, the destination has not taken it yet
        # someone else holding the file makes cont fail, and the machine stays paused
        with open(img, "r+b") as f:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            error = await qmp_error(dst.execute("cont"))
            assert error == f'Failed to get "write" lock: Is another process using the image [{img}]?'
            assert (await dst.execute("query-status"))["status"] == "paused"
        await dst.execute("cont")
        assert (await dst.execute("query-status"))["status"] == "running"
        assert locked_elsewhere(img)
    finally:
        await src.disconnect()
        await dst.disconnect()
