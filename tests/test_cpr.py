"""mode cpr-reboot and x-ignore-shared: a machine whose RAM is a shared file is replaced by a new process
that maps the same file; only what is not in the file (other RAM, device state) goes through the stream."""

from __future__ import annotations

import os

from mig_core.testing import Host, connect, qmp_error, ram_digest, wait_for_status

SHARED, OTHER = 32 << 20, 8 << 20


def ram_args(tmp_path, backing: str = "file") -> tuple[str, ...]:
    shared = f"pc.ram=32M,backing=file,path={tmp_path}/pc.ram" if backing == "file" else "pc.ram=32M"
    return ("--ram", shared, "--ram", "extra=8M", "--vcpus", "2", "--dirty-rate", "4M")


async def caps(client, **states: bool) -> None:
    await client.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": k.replace("_", "-"), "state": v} for k, v in states.items()]})


async def test_cpr_reboot_replaces_the_process_without_copying_shared_ram(start_host, tmp_path):
    old = start_host(*ram_args(tmp_path), "--ram-fill", "half", name="old")
    c = await connect(old.sock)
    await caps(c, x_ignore_shared=True, events=True)
    await c.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
    state = tmp_path / "state.img"
    await c.execute("migrate", {"uri": f"file:{state}"})
    info = await wait_for_status(c, {"completed", "failed"})
    assert info["status"] == "completed", info
    assert (await c.execute("query-status"))["status"] == "postmigrate"
    assert info["ram"]["total"] == OTHER  # the shared file's pages are not this migration's
    assert state.stat().st_size < OTHER  # half of the other block holds data; none of the 32 MiB file went
    saved = await ram_digest(c, SHARED + OTHER, tmp_path / "old.ram")
    await c.execute("quit")
    old.proc.wait(10)
    new = start_host(*ram_args(tmp_path), "--cap", "x-ignore-shared=on", "--incoming", f"file:{state}", "-S",
                     name="new")
    c2 = await connect(new.sock)
    info = await wait_for_status(c2, {"completed", "failed"})
    assert info["status"] == "completed", info
    assert await ram_digest(c2, SHARED + OTHER, tmp_path / "new.ram") == saved
    await c2.execute("cont")
    assert (await c2.execute("query-status"))["status"] == "running"
    await c2.disconnect()


async def test_a_memfd_the_host_keeps_is_not_copied(tmp_path):
    """A parent that keeps the RAM's memfd hands it to the old process and then to the new one."""
    fd = os.memfd_create("guest-ram", 0)
    os.ftruncate(fd, SHARED)
    ram = ("--ram", f"pc.ram=32M,backing=memfd,fd={fd}", "--ram", "extra=8M", "--cap", "x-ignore-shared=on")
    old = Host(tmp_path, *ram, "--ram-fill", "half", "--param", "mode=cpr-reboot", name="old", pass_fds=(fd,))
    new = None
    try:
        c = await connect(old.sock)
        await c.execute("migrate", {"uri": f"file:{tmp_path}/state.img"})
        info = await wait_for_status(c, {"completed", "failed"})
        assert info["status"] == "completed" and info["ram"]["total"] == OTHER, info
        assert (tmp_path / "state.img").stat().st_size < OTHER
        saved = await ram_digest(c, SHARED + OTHER, tmp_path / "old.ram")
        await c.execute("quit")
        old.proc.wait(10)
        new = Host(tmp_path, *ram, "--incoming", f"file:{tmp_path}/state.img", "-S", name="new", pass_fds=(fd,))
        c2 = await connect(new.sock)
        assert (await wait_for_status(c2, {"completed", "failed"}))["status"] == "completed"
        assert await ram_digest(c2, SHARED + OTHER, tmp_path / "new.ram") == saved
        await c2.disconnect()
    finally:
        old.stop()
        if new is not None:
            new.stop()
        os.close(fd)


async def test_destination_must_map_the_same_file(start_host, tmp_path):
    src = start_host(*ram_args(tmp_path), "--ram-fill", "half", name="src")
    c = await connect(src.sock)
    await caps(c, x_ignore_shared=True)
    await c.execute("migrate", {"uri": f"file:{tmp_path}/s.img"})
    assert (await wait_for_status(c, {"completed", "failed"}))["status"] == "completed"
    cases = [
        (ram_args(tmp_path, "anonymous"), True,
         f"x-ignore-shared: the source maps RAM block 'pc.ram' from {tmp_path}/pc.ram, but this host's block is "
         "anonymous memory: map the same file (--ram ...,backing=file,path=P)"),
        (("--ram", f"pc.ram=32M,backing=file,path={tmp_path}/other.ram", *ram_args(tmp_path)[2:]), True,
         f"x-ignore-shared: RAM block 'pc.ram' maps {tmp_path}/other.ram here but {tmp_path}/pc.ram on the "
         "source: not the same file"),
        (ram_args(tmp_path), False, "Capability x-ignore-shared is off, but received capability is on"),
    ]
    for i, (args, ignore, error) in enumerate(cases):
        d = start_host(*args, "--incoming", "defer", name=f"dst{i}")
        dc = await connect(d.sock)
        await caps(dc, x_ignore_shared=ignore)
        await dc.execute("migrate-incoming", {"uri": f"file:{tmp_path}/s.img", "exit-on-error": False})
        info = await wait_for_status(dc, {"failed", "completed"})
        assert info.get("error-desc") == f"load of migration failed: {error}", info
        await dc.disconnect()
    await c.disconnect()


async def test_cpr_rules(start_host, tmp_path):
    h = start_host(*ram_args(tmp_path), name="h")
    c = await connect(h.sock)
    await c.execute("migrate-set-parameters", {"mode": "cpr-reboot"})
    await caps(c, postcopy_ram=True)
    assert await qmp_error(c.execute("migrate", {"uri": "tcp:127.0.0.1:1"})) == "Cannot use postcopy with CPR"
    await caps(c, postcopy_ram=False, x_ignore_shared=True, mapped_ram=True)
    assert await qmp_error(c.execute("migrate", {"uri": f"file:{tmp_path}/m.img"})) == (
        "mig cannot combine x-ignore-shared with mapped-ram yet")
    await caps(c, mapped_ram=False)
    # cpr-reboot stops the machine when it connects; a migration that fails resumes it
    await c.execute("migrate", {"uri": "exec:exit 3"})
    info = await wait_for_status(c, {"failed", "completed"})
    assert info["status"] == "failed", info
    assert (await c.execute("query-status"))["status"] == "running"
    events = [e["event"] for e in h.log_events() if e.get("event") == "runstate_changed"]
    assert len(events) >= 2  # stopped, then running again
    await c.disconnect()
