"""Real network faults: two hosts on a veth link whose cable is pulled, and a proxy process that delays,
stalls, drops or corrupts the stream. Every scenario ends with the migration completed exact, or failed
with the source running and its RAM intact, within the TCP user timeout the hosts were given; the table
of these scenarios is in docs/network-faults.md."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mig_core.testing import Host, connect, ram_digest, wait_for_status
from mig_core.testing.fault_proxy import ProxyProcess
from mig_core.testing.netns import NetnsUnavailable, VethLink

RAM = 32 << 20
#: the bound every failure must come within: both hosts get this TCP user timeout
USER_TIMEOUT = 3
WL = ("--ram", "32M", "--ram-fill", "random", "--tcp-user-timeout", str(USER_TIMEOUT))
#: what each failure may take beyond the user timeout: the retransmission in flight when it expires,
#: and the host noticing (generous: a slow, busy machine)
SLACK = 15
#: for the scenarios that must complete: a timeout far beyond the outage, whatever TCP's retransmission
#: backoff (after a 1.5 s outage the next retransmission may come about 3 s after the first loss)
PATIENT = ("--tcp-user-timeout", "30")


@pytest.fixture
def link():
    try:
        veth = VethLink()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces are not available here: {e}")
    yield veth
    veth.close()


@pytest.fixture
def hosts(tmp_path):
    started: list[Host] = []

    def start(*args: str, name: str, wrapper: list[str] | None = None) -> Host:
        h = Host(tmp_path, *WL, *args, name=f"{name}{len(started)}", wrapper=wrapper)
        started.append(h)
        return h

    yield start
    for h in started:
        h.stop()


async def sent_at_least(src, nbytes: int) -> None:
    """Wait until the source has sent ``nbytes`` of RAM (so a fault lands mid-stream)."""
    while True:
        info = await src.execute("query-migrate")
        assert info.get("status") in ("setup", "active"), info
        if info.get("ram", {}).get("transferred", 0) >= nbytes:
            return
        await asyncio.sleep(0.02)


async def assert_exact(src, dst, tmp_path: Path) -> None:
    info = await wait_for_status(src, {"completed", "failed"}, timeout=120)
    assert info["status"] == "completed", info
    assert (await wait_for_status(dst, {"completed", "failed"}, timeout=30))["status"] == "completed"
    assert await ram_digest(src, RAM, tmp_path / "s.mem") == await ram_digest(dst, RAM, tmp_path / "d.mem")


async def assert_failed_in_time(src, since: float, before: str, tmp_path: Path) -> str:
    """The source failed within the user timeout (and slack), is paused as it was, with the RAM it had."""
    info = await wait_for_status(src, {"completed", "failed"}, timeout=USER_TIMEOUT + SLACK)
    took = time.monotonic() - since
    assert info["status"] == "failed", info
    assert took < USER_TIMEOUT + SLACK, took
    assert (await src.execute("query-status"))["status"] == "paused"  # as it was before: nothing moved on
    assert await ram_digest(src, RAM, tmp_path / "after.mem") == before
    print(f"source failed {took:.1f} s after the fault: {info['error-desc']}")  # for the table in docs
    return str(info["error-desc"])


async def stopped_source(hosts, wrapper=None):
    """A source whose RAM holds still (stopped), so 'intact' means the same digest before and after."""
    s = hosts(name="src", wrapper=wrapper)
    src = await connect(s.sock, "src")
    await src.execute("stop")
    return s, src


# -- a pulled cable between two namespaces ------------------------------------------------------------------


async def test_a_link_down_for_a_moment_then_up_completes_exact(link, hosts, tmp_path):
    s = hosts(*PATIENT, name="src", wrapper=link.prefix("a"))
    d = hosts(*PATIENT, "--incoming", "defer", "-S", name="dst", wrapper=link.prefix("b"))
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    await dst.execute("migrate-incoming", {"uri": f"tcp:{link.address('b')}:4444"})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 8 << 20})
    await src.execute("migrate", {"uri": f"tcp:{link.address('b')}:4444"})
    await sent_at_least(src, 4 << 20)
    link.down()
    await asyncio.sleep(1.5)  # far shorter than the user timeout: TCP retransmits afterwards
    link.up()
    await assert_exact(src, dst, tmp_path)


async def test_a_link_that_stays_down_fails_both_ends_in_time_and_the_source_migrates_again(link, hosts,
                                                                                            tmp_path):
    s, src = await stopped_source(hosts, link.prefix("a"))
    before = await ram_digest(src, RAM, tmp_path / "before.mem")
    d = hosts("--incoming", "defer", "-S", name="dst", wrapper=link.prefix("b"))
    dst = await connect(d.sock, "dst")
    await dst.execute("migrate-incoming", {"uri": f"tcp:{link.address('b')}:4444"})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 8 << 20})
    await src.execute("migrate", {"uri": f"tcp:{link.address('b')}:4444"})
    await sent_at_least(src, 4 << 20)
    link.down()
    since = time.monotonic()
    error = await assert_failed_in_time(src, since, before, tmp_path)
    # what the kernel reports when the user timeout ends the connection: ETIMEDOUT, or the last soft error
    # a retransmission met (ENETUNREACH once the down link's route is gone, depending on when it went)
    assert "timed out" in error or "Network is unreachable" in error, error
    # the destination's connection is dead too: it fails (and exits, exit-on-error) within the same bound
    assert d.proc.wait(USER_TIMEOUT + SLACK) == 1
    assert time.monotonic() - since < USER_TIMEOUT + SLACK
    link.up()
    d2 = hosts("--incoming", "defer", "-S", name="dst", wrapper=link.prefix("b"))
    dst2 = await connect(d2.sock, "dst2")
    await dst2.execute("migrate-incoming", {"uri": f"tcp:{link.address('b')}:4445"})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
    await src.execute("migrate", {"uri": f"tcp:{link.address('b')}:4445"})
    await assert_exact(src, dst2, tmp_path)


# -- a proxy process that delays, stalls, drops or corrupts --------------------------------------------------


async def through_proxy(hosts, tmp_path, fault: str, at: int = 0, ms: int = 0, conn: int = 0,
                        channels: int = 0, stop_source: bool = False):
    """Source and destination on loopback with the fault proxy between them; the migration started.
    A stopped source is to fail (the user timeout of 3 s); a running one is to complete (patient)."""
    if stop_source:
        s, src = await stopped_source(hosts)
    else:
        s = hosts(*PATIENT, name="src")
        src = await connect(s.sock, "src")
    before = await ram_digest(src, RAM, tmp_path / "before.mem") if stop_source else ""
    d = hosts(*(() if stop_source else PATIENT), "--incoming", "defer", "-S", name="dst")
    dst = await connect(d.sock, "dst")
    if channels:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
            await c.execute("migrate-set-parameters", {"multifd-channels": channels})
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
    proxy = ProxyProcess(f"127.0.0.1:{port}", fault, at=at, ms=ms, conn=conn)
    await src.execute("migrate-set-parameters", {"max-bandwidth": 16 << 20})
    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{proxy.port}"})
    return proxy, d, src, dst, before


@pytest.mark.parametrize("fault,at,ms", [("delay", 0, 40), ("stall", 4 << 20, 1500)],
                         ids=["40-ms-delay-on-every-chunk", "1.5-s-stall"])
async def test_a_delay_or_a_short_stall_completes_exact(hosts, tmp_path, fault, at, ms):
    proxy, _d, src, dst, _ = await through_proxy(hosts, tmp_path, fault, at=at, ms=ms)
    try:
        assert proxy.fired()
        await assert_exact(src, dst, tmp_path)
    finally:
        proxy.stop()


async def test_a_stall_for_good_fails_the_source_in_time(hosts, tmp_path):
    proxy, d, src, _dst, before = await through_proxy(hosts, tmp_path, "stall", at=4 << 20, stop_source=True)
    try:
        assert proxy.fired()
        await assert_failed_in_time(src, time.monotonic(), before, tmp_path)
    finally:
        proxy.stop()  # the hung middlebox goes away: the destination's connection closes, and it fails
    assert d.proc.wait(USER_TIMEOUT + SLACK) == 1


@pytest.mark.parametrize("channels,conn", [(0, 0), (4, 3)], ids=["main-channel", "one-multifd-channel"])
async def test_a_dropped_connection_fails_both_ends_at_once(hosts, tmp_path, channels, conn):
    proxy, d, src, _dst, before = await through_proxy(hosts, tmp_path, "drop", at=1 << 20, conn=conn,
                                                      channels=channels, stop_source=True)
    try:
        assert proxy.fired()
        await assert_failed_in_time(src, time.monotonic(), before, tmp_path)
        assert d.proc.wait(USER_TIMEOUT + SLACK) == 1
    finally:
        proxy.stop()


#: the reader's refusals of a corrupt header field (docs/stream-format.md)
FRAMING = ("section", "page batch", "multifd", "packet", "stream")


async def _checksummed(src, dst) -> None:
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-checksums", "state": True}, {"capability": "return-path", "state": True}]})


@pytest.mark.parametrize("channels,conn,at", [(0, 0, 40), (0, 0, (8 << 20) + 12345), (4, 1, (2 << 20) + 777)],
                         ids=["stream-header", "page-data", "multifd-page-data"])
async def test_a_flipped_bit_fails_the_migration_with_checksums(hosts, tmp_path, channels, conn, at):
    s, src = await stopped_source(hosts)
    before = await ram_digest(src, RAM, tmp_path / "before.mem")
    d = hosts("--incoming", "defer", "-S", name="dst")
    dst = await connect(d.sock, "dst")
    await _checksummed(src, dst)
    if channels:
        for c in (src, dst):
            await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]})
            await c.execute("migrate-set-parameters", {"multifd-channels": channels})
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
    proxy = ProxyProcess(f"127.0.0.1:{port}", "corrupt", at=at, conn=conn)
    try:
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{proxy.port}"})
        assert proxy.fired()
        error = await assert_failed_in_time(src, time.monotonic(), before, tmp_path)
        info = await wait_for_status(dst, {"completed", "failed"})
        assert info["status"] == "failed", info
        dst_error = info["error-desc"]
        # almost always the checksum; a flip that lands on a header field the reader checks before the
        # checksum arrives (a count, a block index: a few bytes in a MiB) is refused by that check
        assert "checksum" in dst_error or (at > 1000 and any(w in dst_error for w in FRAMING)), (dst_error, error)
        print(f"destination: {dst_error}")
        assert (await dst.execute("query-status"))["status"] != "running"  # never ran on corrupt pages
    finally:
        proxy.stop()


async def test_without_checksums_a_flipped_page_bit_goes_unnoticed(hosts, tmp_path):
    """Why x-checksums exists: on a plain link nothing checks page data (QEMU does not either). A flip that
    lands in framing instead (a page batch's header or offsets: about 0.2 % of the stream) fails the
    migration; then the next offset is tried."""
    outcomes = []
    for at in ((8 << 20) + 12345, (9 << 20) + 4321, (10 << 20) + 999):
        s, src = await stopped_source(hosts)
        d = hosts("--incoming", "defer", "-S", name="dst")
        dst = await connect(d.sock, "dst")
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
        port = (await dst.execute("query-migrate"))["socket-address"][0]["port"]
        proxy = ProxyProcess(f"127.0.0.1:{port}", "corrupt", at=at)
        try:
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{proxy.port}"})
            assert proxy.fired()
            outcome = (await wait_for_status(src, {"completed", "failed"}, timeout=60))["status"]
            outcomes.append(outcome)
            if outcome == "completed":
                assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
                assert await ram_digest(src, RAM, tmp_path / "s.mem") != await ram_digest(dst, RAM,
                                                                                          tmp_path / "d.mem")
                return
        finally:
            proxy.stop()
            s.stop()
            d.stop()
    raise AssertionError(f"every flip landed in framing: {outcomes}")


async def test_a_link_down_in_postcopy_pauses_both_sides_and_recovers_exact_after_it_returns(link, hosts,
                                                                                               tmp_path):
    """Postcopy cannot fail back to the source (the destination runs): a dead link pauses both sides, within
    the timeouts, and migrate-recover plus migrate resume=true finish it over the link once it is back."""
    s = hosts(name="src", wrapper=link.prefix("a"))
    d = hosts("--incoming", "defer", "-S", name="dst", wrapper=link.prefix("b"))
    src, dst = await connect(s.sock, "src"), await connect(d.sock, "dst")
    for c in (src, dst):
        await c.execute("migrate-set-capabilities", {"capabilities": [{"capability": "postcopy-ram", "state": True}]})
    # an idle destination notices the dead link by keep-alive: probes after 1 s, 1 s apart
    keep = ",keep-alive=on,keep-alive-idle=1,keep-alive-interval=1,keep-alive-count=2"
    await dst.execute("migrate-incoming", {"uri": f"tcp:{link.address('b')}:4444{keep}"})
    await src.execute("migrate-set-parameters", {"max-bandwidth": 8 << 20, "max-postcopy-bandwidth": 8 << 20})
    await src.execute("migrate", {"uri": f"tcp:{link.address('b')}:4444{keep}"})
    await wait_for_status(src, {"active"})
    await src.execute("migrate-start-postcopy")
    while True:
        info = await src.execute("query-migrate")
        assert info["status"] in ("active", "device", "postcopy-active"), info
        if info["status"] == "postcopy-active" and info["ram"]["postcopy-bytes"] >= 1 << 20:
            break
        await asyncio.sleep(0.02)
    link.down()
    since = time.monotonic()
    await wait_for_status(src, {"postcopy-paused"}, timeout=USER_TIMEOUT + SLACK)
    await wait_for_status(dst, {"postcopy-paused"}, timeout=USER_TIMEOUT + SLACK)
    assert time.monotonic() - since < USER_TIMEOUT + SLACK
    link.up()
    await dst.execute("migrate-recover", {"uri": f"tcp:{link.address('b')}:4445"})
    await src.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
    await src.execute("migrate", {"uri": f"tcp:{link.address('b')}:4445", "resume": True})
    await assert_exact(src, dst, tmp_path)
