"""Postcopy between two real ``mig run`` processes: switch, pages on demand, completion."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from mig_core.testing import connect, pause_and_recover, ram_digest, wait_for_status, wait_postcopy_bytes

RAM = 32 << 20
WORKLOAD = ("--ram", "32M", "--ram-fill", "random", "--vcpus", "3", "--dirty-rate", "16M")


async def _pair(start_host, dst_extra=(), caps=("events", "postcopy-ram"), src_extra=()):
    src_h = start_host(*WORKLOAD, *src_extra, name="src")
    dst_h = start_host(*WORKLOAD, *dst_extra, "--incoming", "defer", name="dst")
    src, dst = await connect(src_h.sock, "src"), await connect(dst_h.sock, "dst")
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": x, "state": True} for x in caps]})
    return src_h, dst_h, src, dst


async def _disconnect(*clients):
    for c in clients:
        with contextlib.suppress(Exception):
            await c.disconnect()


async def _assert_exact_but_what_the_workload_wrote(src, dst, dst_h, tmp_path):
    """Stop the destination; every page equals the source's except the 8 bytes the workload writes per page.

    The workload writes only the first word of a page (and its records in page 0): every other byte of
    every page must be the source's, so no page was lost, zeroed or misplaced; and every read-back the
    workload made saw what it had written.
    """
    await dst.execute("stop")
    await ram_digest(src, RAM, tmp_path / "s.mem")
    await ram_digest(dst, RAM, tmp_path / "d.mem")
    s = np.fromfile(tmp_path / "s.mem", np.uint8).reshape(-1, 4096)
    d = np.fromfile(tmp_path / "d.mem", np.uint8).reshape(-1, 4096)
    assert np.array_equal(s[1:, 8:], d[1:, 8:])
    assert "workload_inconsistent" not in dst_h.logs()


async def _migrate_through_proxy(src, dst, tmp_path, bandwidth):
    """Start a migration whose connection runs through a CuttableProxy (returned); postcopy not yet."""
    from mig_core.testing.proxy import CuttableProxy

    await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/dst.sock"})
    proxy = CuttableProxy(tmp_path / "proxy.sock", tmp_path / "dst.sock")
    await src.execute("migrate-set-parameters", {"max-bandwidth": bandwidth, "max-postcopy-bandwidth": bandwidth})
    await src.execute("migrate", {"uri": f"unix:{tmp_path}/proxy.sock"})
    await wait_for_status(src, {"active"})
    return proxy


async def _start_postcopy(src, dst, tmp_path, bandwidth=8 << 20):
    uri = f"unix:{tmp_path}/pc.sock"
    await dst.execute("migrate-incoming", {"uri": uri})
    # slow enough that precopy cannot finish before the switch: most pages travel in postcopy
    await src.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
    await src.execute("migrate", {"uri": uri})
    await wait_for_status(src, {"active"})
    await src.execute("migrate-start-postcopy")


@pytest.mark.parametrize("prealloc", [False, True])
@pytest.mark.parametrize("switch", ["at once", "after a pass"])
async def test_postcopy_paused_destination_is_exact(start_host, tmp_path, switch, prealloc):
    """Preallocated, the destination's fresh RAM is first watched by a write witness, which must have let go
    before postcopy registers the RAM for missing pages."""
    src_h, dst_h, src, dst = await _pair(start_host, dst_extra=("-S",) + (("--mem-prealloc",) if prealloc else ()))
    try:
        if switch == "at once":  # most pages are still to come: the destination swaps in fresh memory
            await _start_postcopy(src, dst, tmp_path)
        else:  # most pages arrived in precopy: the destination drops only what is stale
            await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/pc.sock"})
            await src.execute("migrate-set-parameters", {"max-bandwidth": 64 << 20, "max-postcopy-bandwidth": 4 << 20})
            await src.execute("migrate", {"uri": f"unix:{tmp_path}/pc.sock"})
            for _ in range(3000):
                info = await src.execute("query-migrate")
                if info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                    break
                await asyncio.sleep(0.01)
            await src.execute("migrate-start-postcopy")
        info = await wait_for_status(src, {"postcopy-active", "completed", "failed"})
        assert info["status"] in ("postcopy-active", "completed"), info
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        await wait_for_status(dst, {"completed"})
        ram = done["ram"]
        if switch == "at once":
            assert ram["postcopy-bytes"] > RAM // 2, ram  # most pages went after the switch
        else:
            assert 0 < ram["postcopy-bytes"] < RAM // 2, ram
        dropped = [e for e in dst_h.log_events() if e.get("event") == "postcopy_fresh_mapping"]
        assert bool(dropped) == (switch == "at once")
        assert done["downtime"] >= 0
        assert await src.execute("query-status") == {"running": False, "status": "postmigrate"}
        assert await dst.execute("query-status") == {"running": False, "status": "paused"}
        assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")
        witness = next(e for e in dst_h.log_events() if e.get("event") == "write_witness")
        # preallocated, it watches unless the kernel had few huge pages to give (fragmented memory)
        assert witness["watched"] == prealloc or witness.get("why_not") == "not mapped with huge pages", witness
    finally:
        await _disconnect(src, dst)


@pytest.mark.parametrize("prefetch", [0, 8])
async def test_postcopy_running_destination_serves_faults(start_host, tmp_path, prefetch):
    src_h, dst_h, src, dst = await _pair(start_host, src_extra=("--postcopy-prefetch", str(prefetch)))
    try:
        await _start_postcopy(src, dst, tmp_path, bandwidth=4 << 20)
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        await wait_for_status(dst, {"completed"})
        assert done["ram"]["postcopy-requests"] > 0, done  # the destination's vCPUs asked for pages
        await _assert_exact_but_what_the_workload_wrote(src, dst, dst_h, tmp_path)
        assert (await dst.execute("query-status"))["status"] == "paused"
        (end,) = [e for e in src_h.log_events() if e.get("event") == "migration_completed"]
        assert (end["prefetched_pages"] > 0) == bool(prefetch), end  # pages sent after each requested one
        # every page arrived: RAM left userfaultfd's missing mode
        assert any(e.get("event") == "uffd_unregistered" and e.get("mode") == "missing"
                   for e in dst_h.log_events())
    finally:
        await _disconnect(src, dst)


async def test_postcopy_link_cut_pauses_both_sides_and_recovers_exactly(start_host, tmp_path):
    src_h, dst_h, src, dst = await _pair(start_host, dst_extra=("-S",))
    proxy = None
    try:
        proxy = await _migrate_through_proxy(src, dst, tmp_path, 4 << 20)
        # wrong states, with QEMU's texts
        with pytest.raises(Exception, match="Migrate recover can only be run when postcopy is paused."):
            await dst.execute("migrate-recover", {"uri": f"unix:{tmp_path}/r.sock"})
        with pytest.raises(Exception, match="migrate-pause is currently only supported during postcopy-active"):
            await src.execute("migrate-pause")
        with pytest.raises(Exception, match="Cannot resume if there is no paused migration"):
            await src.execute("migrate", {"uri": f"unix:{tmp_path}/r.sock", "resume": True})
        await src.execute("migrate-start-postcopy")
        await wait_postcopy_bytes(src, 1 << 20)
        with pytest.raises(Exception, match="Postcopy migration in progress, cannot cancel."):
            await src.execute("migrate_cancel")
        proxy.cut()
        await wait_for_status(src, {"postcopy-paused"})
        await wait_for_status(dst, {"postcopy-paused"})
        with pytest.raises(Exception, match="There's a migration process in progress"):
            await src.execute("migrate", {"uri": f"unix:{tmp_path}/r.sock"})
        await dst.execute("migrate-recover", {"uri": f"unix:{tmp_path}/r.sock"})
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/r.sock", "resume": True})
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")
    finally:
        if proxy is not None:
            proxy.close()
        await _disconnect(src, dst)


async def test_migrate_pause_and_recover_twice(start_host, tmp_path):
    src_h, dst_h, src, dst = await _pair(start_host, dst_extra=("-S",))
    try:
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 4 << 20})
        await _start_postcopy(src, dst, tmp_path, bandwidth=4 << 20)
        await wait_postcopy_bytes(src, 1 << 20)
        for i, pauser in enumerate((src, dst)):
            await pause_and_recover(src, dst, pauser, f"unix:{tmp_path}/r{i}.sock")
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        await wait_for_status(dst, {"completed"})
        assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")
    finally:
        await _disconnect(src, dst)


def _threads_in_fault(pid: int) -> int:
    """How many threads of ``pid`` wait in the kernel for a userfaultfd page (wchan handle_userfault)."""
    from pathlib import Path

    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text().strip() == "handle_userfault":
                n += 1
        except OSError:
            continue
    return n


async def test_destination_qmp_answers_while_a_vcpu_waits_on_a_cut_link(start_host, tmp_path):
    import asyncio

    src_h, dst_h, src, dst = await _pair(start_host)  # the destination runs: its vCPUs fault
    proxy = None
    try:
        proxy = await _migrate_through_proxy(src, dst, tmp_path, 2 << 20)
        await src.execute("migrate-start-postcopy")
        await wait_postcopy_bytes(src, 256 << 10)
        proxy.cut()
        await wait_for_status(src, {"postcopy-paused"})
        paused = await wait_for_status(dst, {"postcopy-paused"})
        assert "cannot complete without it" in paused["error-desc"], paused
        # a vCPU touches a page that cannot arrive now: it waits in the kernel (holding the GIL, this
        # stops every thread of the destination process, its QMP server included)
        for _ in range(500):
            if _threads_in_fault(dst_h.proc.pid):
                break
            await asyncio.sleep(0.02)
        assert _threads_in_fault(dst_h.proc.pid), "no destination thread waits on a missing page"
        # the monitor answers, again and again, while the fault goes on (a server stuck behind the fault
        # would never answer: nothing arrives until migrate-recover, which it would have to read first)
        for _ in range(20):
            info = await asyncio.wait_for(dst.execute("query-migrate"), 10)
            assert info["status"] == "postcopy-paused", info
            assert _threads_in_fault(dst_h.proc.pid)  # still blocked: nothing arrived meanwhile
            await asyncio.sleep(0.05)
        await asyncio.wait_for(dst.execute("migrate-recover", {"uri": f"unix:{tmp_path}/r.sock"}), 10)
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        await src.execute("migrate", {"uri": f"unix:{tmp_path}/r.sock", "resume": True})
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        assert "error-desc" not in done
        await wait_for_status(dst, {"completed"})
        await _assert_exact_but_what_the_workload_wrote(src, dst, dst_h, tmp_path)
    finally:
        if proxy is not None:
            proxy.close()
        await _disconnect(src, dst)


def _page_server_pid(host) -> int:
    pids = [e["pid"] for e in host.log_events() if e.get("event") == "page_server_started"]
    assert pids, "no page server was started"
    return int(pids[-1])


@pytest.mark.parametrize("while_paused", [False, True])
async def test_killed_page_server_fails_the_destination_loudly(start_host, tmp_path, while_paused):
    import asyncio
    import os
    import signal

    src_h, dst_h, src, dst = await _pair(start_host)
    try:
        await _start_postcopy(src, dst, tmp_path, bandwidth=2 << 20)
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 2 << 20})
        await wait_postcopy_bytes(src, 256 << 10)
        if while_paused:  # a vCPU then waits on a page that cannot come, which may stop the whole host
            await dst.execute("migrate-pause")
            await wait_for_status(dst, {"postcopy-paused"})
            for _ in range(500):
                if _threads_in_fault(dst_h.proc.pid):
                    break
                await asyncio.sleep(0.02)
        os.kill(_page_server_pid(dst_h), signal.SIGKILL)
        # the machine cannot continue without the pages that never came: the destination process ends
        # (by itself, or killed by its monitor front if a fault holds it), never runs on with zero pages
        for _ in range(1000):
            if dst_h.proc.poll() is not None:
                break
            await asyncio.sleep(0.02)
        assert dst_h.proc.poll() not in (None, 0), "the destination did not end"
        logs = dst_h.logs()
        assert "page_server_died" in logs and "cannot continue" in logs, logs[-3000:]
        # the source loses its destination: it pauses and says why resuming elsewhere is impossible
        paused = await wait_for_status(src, {"postcopy-paused"})
        assert "same destination process" in paused["error-desc"], paused
    finally:
        await _disconnect(src, dst)


async def test_killed_source_leaves_the_destination_paused(start_host, tmp_path):
    import os
    import signal

    src_h, dst_h, src, dst = await _pair(start_host, dst_extra=("-S",))
    try:
        await _start_postcopy(src, dst, tmp_path, bandwidth=2 << 20)
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 2 << 20})
        await wait_postcopy_bytes(src, 256 << 10)
        os.kill(src_h.proc.pid, signal.SIGKILL)
        paused = await wait_for_status(dst, {"postcopy-paused"})
        assert "cannot complete without it" in paused["error-desc"], paused
        with pytest.raises(Exception, match="migrate-pause is currently only supported during postcopy-active"):
            await dst.execute("migrate-pause")
    finally:
        await _disconnect(src, dst)


@pytest.mark.parametrize("preempt", [False, True])
async def test_postcopy_after_multifd_precopy(start_host, tmp_path, preempt):
    caps = ("events", "postcopy-ram", "multifd") + (("postcopy-preempt",) if preempt else ())
    src_h, dst_h, src, dst = await _pair(start_host, caps=caps)
    try:
        await _start_postcopy(src, dst, tmp_path, bandwidth=8 << 20)
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 4 << 20})
        info = await wait_postcopy_bytes(src, 64 << 10)
        assert info["ram"]["multifd-bytes"] > 0, info  # precopy went over the multifd channels
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        await wait_for_status(dst, {"completed"})
        assert done["ram"]["postcopy-requests"] > 0
        await _assert_exact_but_what_the_workload_wrote(src, dst, dst_h, tmp_path)
    finally:
        await _disconnect(src, dst)


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_blocktime_and_release_ram(start_host, tmp_path):
    import asyncio

    src_h = start_host(*WORKLOAD, name="src")
    dst_h = start_host(*WORKLOAD, "--incoming", "defer", name="dst")
    src, dst = await connect(src_h.sock, "src"), await connect(dst_h.sock, "dst")
    on = lambda *caps: {"capabilities": [{"capability": c, "state": True} for c in caps]}  # noqa: E731
    try:
        await src.execute("migrate-set-capabilities", on("events", "postcopy-ram", "release-ram"))
        await dst.execute("migrate-set-capabilities", on("events", "postcopy-ram", "postcopy-blocktime"))
        before = _rss(src_h.proc.pid)
        await _start_postcopy(src, dst, tmp_path, bandwidth=4 << 20)
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 8 << 20})
        samples = []
        while (info := await src.execute("query-migrate"))["status"] not in ("completed", "failed"):
            samples.append((info["status"], _rss(src_h.proc.pid)))
            await asyncio.sleep(0.05)
        assert info["status"] == "completed", info
        during = [r for st, r in samples if st == "postcopy-active"]
        assert during and min(during) < before - RAM // 4, (before, samples)  # freed as it went
        assert _rss(src_h.proc.pid) < before - RAM * 3 // 4  # at the end nearly all of it
        done = await wait_for_status(dst, {"completed"})
        assert done["postcopy-blocktime"] >= 0
        assert len(done["postcopy-vcpu-blocktime"]) == 3 and sum(done["postcopy-vcpu-blocktime"]) > 0, done
        assert "postcopy-blocktime" not in info  # the source does not measure it
    finally:
        await _disconnect(src, dst)


async def test_release_ram_forbids_recovery(start_host, tmp_path):
    src_h, dst_h, src, dst = await _pair(start_host, dst_extra=("-S",))
    try:
        await src.execute("migrate-set-capabilities", {"capabilities": [{"capability": "release-ram", "state": True}]})
        await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 2 << 20})
        await _start_postcopy(src, dst, tmp_path, bandwidth=2 << 20)
        await wait_postcopy_bytes(src, 256 << 10)
        await src.execute("migrate-pause")
        paused = await wait_for_status(src, {"postcopy-paused"})
        assert "cannot resume" in paused["error-desc"], paused
        with pytest.raises(Exception, match="Postcopy recovery cannot work when release-ram capability is set"):
            await src.execute("migrate", {"uri": f"unix:{tmp_path}/r.sock", "resume": True})
    finally:
        await _disconnect(src, dst)


@pytest.mark.parametrize("backing", ["memfd", "file"])
async def test_postcopy_memfd_and_tmpfs_file_backings(start_host, tmp_path, backing):
    import os

    shm = f"/dev/shm/mig-test-{os.getpid()}-{tmp_path.name}"
    ram = "32M,backing=memfd" if backing == "memfd" else None
    src_args = ("--ram", ram or f"32M,backing=file,path={shm}.src", *WORKLOAD[2:])
    dst_args = ("--ram", ram or f"32M,backing=file,path={shm}.dst", *WORKLOAD[2:])
    src_h = start_host(*src_args, name="src")
    dst_h = start_host(*dst_args, "--incoming", "defer", name="dst")
    src, dst = await connect(src_h.sock, "src"), await connect(dst_h.sock, "dst")
    try:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities",
                            {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
        await _start_postcopy(src, dst, tmp_path, bandwidth=4 << 20)
        done = await wait_for_status(src, {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", done
        await wait_for_status(dst, {"completed"})
        await _assert_exact_but_what_the_workload_wrote(src, dst, dst_h, tmp_path)
    finally:
        await _disconnect(src, dst)
        for suffix in (".src", ".dst"):
            with contextlib.suppress(OSError):
                os.unlink(shm + suffix)


async def test_postcopy_refuses_ram_it_cannot_serve(start_host, tmp_path):
    dst_h = start_host("--ram", f"32M,backing=file,path={tmp_path}/ram", "--incoming", "defer", name="dst")
    dst = await connect(dst_h.sock, "dst")
    try:
        with pytest.raises(Exception, match=r"Postcopy is not supported: Host backend files need to be TMPFS or "
                                            r"HUGETLBFS only \(RAM block 'pc.ram' is .*/ram\)"):
            await dst.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
    finally:
        await dst.disconnect()


async def test_postcopy_command_errors_in_the_wrong_state(start_host, tmp_path):
    h = start_host("--ram", "8M", name="h")
    c = await connect(h.sock, "h")
    on = lambda *caps: {"capabilities": [{"capability": x, "state": True} for x in caps]}  # noqa: E731
    try:
        with pytest.raises(Exception, match="^Enable postcopy with migrate_set_capability before the start of "
                                            "migration$"):
            await c.execute("migrate-start-postcopy")
        await c.execute("migrate-set-capabilities", on("dirty-bitmaps"))
        with pytest.raises(Exception, match="^Postcopy must be started after migration has been started$"):
            await c.execute("migrate-start-postcopy")
        await c.execute("migrate-set-capabilities", on("postcopy-ram"))
        with pytest.raises(Exception, match="^Postcopy must be started after migration has been started$"):
            await c.execute("migrate-start-postcopy")
        with pytest.raises(Exception, match="^Migrate recover can only be run when postcopy is paused.$"):
            await c.execute("migrate-recover", {"uri": f"unix:{tmp_path}/r.sock"})
        with pytest.raises(Exception, match="^migrate-pause is currently only supported during postcopy-active or "
                                            "postcopy-recover state$"):
            await c.execute("migrate-pause")
        with pytest.raises(Exception, match="^Cannot resume if there is no paused migration$"):
            await c.execute("migrate", {"uri": f"unix:{tmp_path}/r.sock", "resume": True})
        with pytest.raises(Exception, match=r"^Postcopy needs a socket transport \(tcp, unix, vsock or fd\): the "
                                            r"exec transport has no return path another process can continue$"):
            await c.execute("migrate", {"uri": "exec:cat > /dev/null"})
        assert (await c.execute("query-migrate")) == {}
    finally:
        await c.disconnect()
