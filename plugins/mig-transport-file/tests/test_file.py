"""The file transport: checkpoint a running machine to a file and restore it in a fresh process."""

from __future__ import annotations

import pytest
from mig_transport_file import parse_offset

from mig_core.testing import connect, qmp_error, ram_digest, wait_for_status
from mig_core.testing.contracts import TransportContract

WL = ("--ram", "16M", "--ram-fill", "half", "--vcpus", "2", "--dirty-rate", "4M")


def test_offsets():
    assert parse_offset("4096") == 4096 and parse_offset("0x1000") == 4096 and parse_offset("4K") == 4096
    assert parse_offset("1M") == 1 << 20
    for bad in ("", "-1", "4Q", "1.5", "0x"):
        with pytest.raises(Exception, match="file URI has bad offset"):
            parse_offset(bad)


@pytest.mark.parametrize("offset", [0, 65536])
async def test_checkpoint_and_restore(start_host, tmp_path, offset):
    image = tmp_path / "vm.img"
    image.write_bytes(b"H" * offset)  # a header of the host's own before the stream
    src = await connect(start_host(*WL, name="src").sock)
    await src.execute("migrate", {"uri": f"file:{image},offset={offset}"})
    assert (await wait_for_status(src, {"completed", "failed"}))["status"] == "completed"
    assert image.read_bytes()[:offset] == b"H" * offset
    assert image.read_bytes()[offset:offset + 8] == b"MIGSTRM\x00"
    dst = await connect(start_host(*WL, "--incoming", "defer", "-S", name="dst").sock)
    await dst.execute("migrate-incoming", {"channels": [{"channel-type": "main", "addr": {
        "transport": "file", "filename": str(image), "offset": offset}}]})
    assert (await wait_for_status(dst, {"completed", "failed"}))["status"] == "completed"
    assert await ram_digest(src, 16 << 20, tmp_path / "s") == await ram_digest(dst, 16 << 20, tmp_path / "d")
    await src.disconnect()
    await dst.disconnect()


async def test_truncated_foreign_and_missing_files(start_host, tmp_path):
    image = tmp_path / "vm.img"
    src = await connect(start_host(*WL, name="src").sock)
    await src.execute("migrate", {"uri": f"file:{image}"})
    await wait_for_status(src, {"completed"})
    data = image.read_bytes()
    cases = {
        "cut.img": (data[: len(data) // 2], "load of migration failed: truncated stream"),
        "foreign.img": (b"\x7fELF" + bytes(100), "load of migration failed: not a mig migration stream"),
    }
    for i, (name, (content, error)) in enumerate(cases.items()):
        (tmp_path / name).write_bytes(content)
        dst = await connect(start_host(*WL, "--incoming", "defer", name=f"dst{i}").sock)
        await dst.execute("migrate-incoming", {"uri": f"file:{tmp_path / name}", "exit-on-error": False})
        info = await wait_for_status(dst, {"failed"})
        assert info["error-desc"].startswith(error), info
        await dst.disconnect()
    dst = await connect(start_host(*WL, "--incoming", "defer", name="dstm").sock)
    assert await qmp_error(dst.execute("migrate-incoming", {"uri": f"file:{tmp_path}/none.img"})) == (
        f"Could not open '{tmp_path}/none.img': No such file or directory")
    assert await qmp_error(src.execute("migrate", {"uri": "file:/x,offset=12Q"})) == "file URI has bad offset 12Q"
    await src.execute("cont")  # out of postmigrate, so migrate may run again
    # as uint64 the schema takes offsets no file can have: refused before anything is opened
    for c, command in ((src, "migrate"), (dst, "migrate-incoming")):
        assert await qmp_error(c.execute(command, {"uri": f"file:{tmp_path}/vm.img,offset={1 << 63}"})) == (
            f"file: offset {1 << 63} is beyond the largest a file can have ({(1 << 63) - 1})")
    assert await qmp_error(src.execute("migrate", {"uri": f"file:{tmp_path}/no/such/dir/vm.img"})) == (
        f"Could not open '{tmp_path}/no/such/dir/vm.img': No such file or directory")
    assert (await src.execute("query-migrate"))["status"] == "failed"
    await dst.disconnect()
    await src.disconnect()


class TestContract(TransportContract):
    """mig's transport contract (mig_core.testing.contracts): a file is written whole, then read."""

    name = "file"
    distribution = "mig-transport-file"
    live_peer = False

    def source_address(self, tmp_path):
        from mig_transport_file import FileTransport

        return FileTransport.parse_uri(f"file:{tmp_path}/contract.img")
