"""The mig command line: demo, run, the generated reference, logging formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mig_core.qmp import reference_doc
from mig_core.testing import RawQMP

REPO = Path(__file__).resolve().parent.parent


def mig(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mig_core", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, **(env or {})))


def test_demo_migrates_and_verifies():
    out = mig("demo", "--ram", "32M", "--dirty-rate", "8M", "--fill", "random", timeout=120,
              env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "migration summary" in text and "status" in text and "completed" in text
    for row in ("total time", "downtime", "setup time", "bytes transferred", "passes", "throughput",
                "zero pages"):
        assert row in text, row
    assert "RAM identical on both sides at switchover: yes" in text
    assert "workload continues on the destination after cont: yes" in text
    assert text.rstrip().endswith("demo: live migration verified")


def test_demo_over_unix_with_options():
    out = mig("demo", "--ram", "16M", "--uri", "unix:", "--cap", "return-path=on", "--cap", "events=on",
              "--param", "downtime-limit=50", timeout=120, env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "via unix:" in out.stdout
    bad = mig("demo", "--cap", "nonsense=on")
    assert bad.returncode == 2 and "unknown capability 'nonsense'" in bad.stderr


def test_demo_with_multifd_and_compression():
    """The issue's example: --cap multifd=on --param multifd-channels=4 (plus a compressor)."""
    out = mig("demo", "--ram", "32M", "--fill", "text", "--cap", "multifd=on", "--param", "multifd-channels=4",
              "--param", "multifd-compression=zstd", timeout=120, env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "RAM identical on both sides at switchover: yes" in out.stdout
    assert out.stdout.rstrip().endswith("demo: live migration verified")


def test_run_refuses_bad_monitor_address():
    for bad, text in [("udp:1", "must be unix:PATH or tcp:HOST:PORT"), ("tcp:localhost", "error parsing address"),
                      ("unix:", "invalid Unix socket address"), ("tcp:h:99999", "error parsing address")]:
        out = mig("run", "--qmp", bad)
        assert out.returncode == 2 and text in out.stderr, out.stderr


def test_run_refuses_bad_ram_options():
    for bad, text in [("64M,backing=hugetlb", "invalid --ram backing 'hugetlb' (anonymous, memfd or file)"),
                      ("64M,color=red", "unknown --ram option 'color' (known: page-size, backing, path, fd)"),
                      ("64M,backing=file", "--ram: backing=file needs path=PATH, and path= only goes with "
                                           "backing=file"),
                      ("64M,path=/dev/shm/x", "--ram: backing=file needs path=PATH"),
                      ("64M,fd=3", "--ram: fd=N goes only with backing=memfd"),
                      ("64M,backing=memfd,fd=x", "--ram: fd=x is not a descriptor number")]:
        out = mig("run", "--ram", bad)
        assert out.returncode == 2 and text in out.stderr, out.stderr
    out = mig("run", "--qmp", "unix:/nonexistent/dir/x.sock", "--ram", "64M,backing=memfd,fd=97")
    assert out.returncode == 2 and "RAM block 'pc.ram': descriptor 97: Bad file descriptor" in out.stderr, out.stderr


def test_run_ram_backings(tmp_path):
    """Default: anonymous memory with huge pages advised (as QEMU); backing=memfd on request, logged as such."""
    sock = tmp_path / "m.sock"
    proc = subprocess.Popen([sys.executable, "-m", "mig_core", "--log-format", "json", "run", "--qmp",
                             f"unix:{sock}", "-S", "--ram", "8M", "--ram", "extra=4M,backing=memfd"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in proc.stdout.readline()
        c = RawQMP(sock)
        c.negotiate()
        assert c.cmd({"execute": "quit"}) == {"return": {}}
        c.close()
        assert proc.wait(10) == 0
        blocks = {ln["block"]: ln for ln in map(json.loads, proc.stderr.read().splitlines())
                  if ln.get("event") == "ram_block_allocated"}
        assert (blocks["pc.ram"]["backing"], blocks["extra"]["backing"]) == ("anonymous", "memfd")
        assert blocks["extra"]["transparent_hugepages"] is False
        assert blocks["pc.ram"]["transparent_hugepages"] is True
    finally:
        proc.kill()


def test_run_states_and_json_logs(tmp_path):
    sock = tmp_path / "m.sock"
    proc = subprocess.Popen([sys.executable, "-m", "mig_core", "--log-format", "json", "run", "--qmp",
                             f"unix:{sock}", "-S"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in proc.stdout.readline()
        c = RawQMP(sock)
        c.negotiate()
        assert c.cmd({"execute": "query-status"})["return"] == {"running": False, "status": "prelaunch"}
        assert c.cmd({"execute": "cont"}) == {"return": {}}
        assert c.cmd({"execute": "quit"}) == {"return": {}}
        c.close()
        assert proc.wait(10) == 0
        lines = [json.loads(line) for line in proc.stderr.read().splitlines()]
        assert any(ln.get("event") == "runstate_changed" and (ln["old"], ln["new"]) == ("prelaunch", "running")
                   for ln in lines)
        assert all({"event", "level", "timestamp"} <= set(ln) for ln in lines)
    finally:
        proc.kill()
        proc.wait()


def test_incoming_defer_host(tmp_path):
    sock = tmp_path / "d.sock"
    proc = subprocess.Popen([sys.executable, "-m", "mig_core", "run", "--qmp", f"unix:{sock}", "--incoming",
                             "defer"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        proc.stdout.readline()
        c = RawQMP(sock)
        c.negotiate()
        assert c.cmd({"execute": "query-status"})["return"] == {"running": False, "status": "inmigrate"}
        # QEMU's qmp_cont on a destination that waits: only remembered (it runs when the migration ends)
        assert c.cmd({"execute": "cont"}) == {"return": {}}
        assert c.cmd({"execute": "query-status"})["return"] == {"running": False, "status": "inmigrate"}
        c.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0  # SIGTERM: orderly exit


def test_reference_doc_is_current():
    committed = (REPO / "docs" / "qmp-reference.md").read_text()
    assert committed == reference_doc.render(), "run `make docs` to regenerate docs/qmp-reference.md"


def test_qmp_shell_drives_mig_unchanged(host):
    shell = Path(sys.executable).parent / "qmp-shell"
    script = ("query-status\nmigrate-set-parameters downtime-limit=77 multifd-channels=8\n"
              "query-migrate-parameters\nmigrate-set-parameters multifd-channels=0\nstop\nquery-status\n")
    out = subprocess.run([str(shell), str(host.sock)], input=script, capture_output=True, text=True, timeout=30)
    replies = [json.loads(line.split("(QEMU) ", 1)[1]) for line in out.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies[0] == {"return": {"running": True, "status": "running"}}
    assert replies[2]["return"]["downtime-limit"] == 77 and replies[2]["return"]["multifd-channels"] == 8
    assert replies[3] == {"error": {"class": "GenericError",
                                    "desc": "Parameter 'multifd_channels' expects a value between 1 and 255"}}
    assert replies[5] == {"return": {"running": False, "status": "paused"}}
