"""mig qmp / info / migrate / shell against real hosts."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time

from prompt_toolkit.document import Document

from mig_core.cli.shell import QMPCompleter, argument_names, parse_line
from mig_core.testing import connect, wait_for_status


def mig(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mig_core", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="200"))


def test_mig_qmp_sends_one_command(host):
    out = mig("qmp", f"unix:{host.sock}", "migrate-set-parameters", "downtime-limit=123", "multifd-channels=4")
    assert out.returncode == 0 and json.loads(out.stdout) == {"return": {}}
    out = mig("qmp", str(host.sock), "query-migrate-parameters")
    params = json.loads(out.stdout)["return"]
    assert params["downtime-limit"] == 123 and params["multifd-channels"] == 4
    out = mig("qmp", str(host.sock), "migrate-set-capabilities",
              '{"capabilities": [{"capability": "events", "state": true}]}')
    assert json.loads(out.stdout) == {"return": {}}
    out = mig("qmp", str(host.sock), "migrate-set-parameters", "multifd-channels=0")
    assert out.returncode == 1
    assert json.loads(out.stdout)["error"] == {
        "class": "GenericError", "desc": "Parameter 'multifd_channels' expects a value between 1 and 255"}
    out = mig("qmp", "unix:/nonexistent.sock", "query-status")
    assert out.returncode == 1 and "cannot connect to unix:/nonexistent.sock" in out.stderr


def test_mig_migrate_and_info(start_host, tmp_path):
    src = start_host("--ram", "16M", "--ram-fill", "random", name="src")
    dst = start_host("--ram", "16M", "--incoming", f"unix:{tmp_path}/m.sock", "-S", name="dst")
    out = mig("migrate", f"unix:{src.sock}", f"unix:{tmp_path}/m.sock", "--cap", "events=on",
              "--param", "max-bandwidth=0", "--autopilot")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "migration summary" in out.stdout and "completed" in out.stdout
    pilot = json.loads(mig("qmp", str(src.sock), "x-query-migration-autopilot").stdout)["return"]
    assert pilot["enabled"] and pilot["decisions"] == []  # on, and nothing to do: it converged at once
    info = mig("info", f"unix:{src.sock}")
    assert info.returncode == 0 and "run state: postmigrate" in info.stdout and '"status": "completed"' in info.stdout
    assert "run state: paused" in mig("info", str(dst.sock)).stdout
    bad = mig("migrate", f"unix:{src.sock}", "bogus:uri")
    assert bad.returncode == 1 and "unknown migration protocol: bogus:uri" in bad.stdout


def test_shell_completion_and_parsing():
    assert "downtime-limit" in argument_names("migrate-set-parameters")
    assert argument_names("migrate") == ["uri", "channels", "detach", "resume"]
    comp = QMPCompleter(["migrate", "migrate-set-parameters", "query-status"])
    names = [c.text for c in comp.get_completions(Document("migrate-se"), None)]
    assert names == ["migrate-set-parameters"]
    args = [c.text for c in comp.get_completions(Document("migrate-set-parameters downtime"), None)]
    assert args == ["downtime-limit="]
    assert parse_line("migrate-set-parameters downtime-limit=5 tls-creds=x") == (
        "migrate-set-parameters", {"downtime-limit": 5, "tls-creds": "x"})
    assert parse_line('migrate {"uri": "tcp:h:1"}') == ("migrate", {"uri": "tcp:h:1"})


class Terminal:
    """``mig shell`` under a real pseudo-terminal; ``expect`` waits for output that arrived after the last match."""

    def __init__(self, sock, tmp_path) -> None:
        self.master, slave = pty.openpty()
        env = dict(os.environ, MIG_SHELL_HISTORY=str(tmp_path / "hist"), TERM="dumb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mig_core", "shell", str(sock)],
                                     stdin=slave, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        self.buf = b""
        self.pos = 0

    def expect(self, token: bytes, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while token not in self.buf[self.pos:] and time.monotonic() < deadline:
            r, _, _ = select.select([self.master], [], [], 0.1)
            if r:
                try:
                    self.buf += os.read(self.master, 65536)
                except OSError:
                    break
        at = self.buf.find(token, self.pos)
        assert at >= 0, (token, self.buf[-2000:])
        self.pos = at + len(token)

    def type(self, text: bytes) -> None:
        os.write(self.master, text)

    def wait_exit(self, timeout: float = 30) -> int:
        """The shell's exit status, reading what it writes meanwhile as a terminal does (a pty whose reader
        stops blocks the writer once its buffer is full, and the shell could never finish)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, ("the shell did not exit", self.buf[-2000:])
            r, _, _ = select.select([self.master], [], [], 0.1)
            if r:
                try:
                    self.buf += os.read(self.master, 65536)
                except OSError:  # the other end closed: the shell is exiting
                    time.sleep(0.05)
        return self.proc.returncode

    def command(self, line: bytes, *replies: bytes) -> None:
        """Type a command, then wait for its replies and for the next prompt (drawn before or after them)."""
        self.type(line + b"\r")
        self.expect(line)  # the echo of what was typed
        mark = self.pos
        for token in (*replies, PROMPT):
            self.pos = mark
            self.expect(token)
        self.pos = max(self.pos, mark)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


PROMPT = b"(mig) "


def test_shell_session_on_a_terminal(host, tmp_path):
    """The interactive shell as a person uses it: each command typed at the prompt, replies and events."""
    t = Terminal(host.sock, tmp_path)
    try:
        t.expect(PROMPT)
        t.command(b'migrate-set-capabilities capabilities=[{"capability":"events","state":true}]', b'{"return": {}}')
        t.command(b"stop", b'{"return": {}}', b'"event": "STOP"')
        t.command(b"query-status", b'"status": "paused"')
        t.command(b"migrate-set-parameters multifd-channels=0", b"expects a value between 1 and 255")
        t.type(b"\x04")  # Ctrl-D ends the shell
        assert t.wait_exit() == 0
        assert b"query-status" in (tmp_path / "hist").read_bytes()
    finally:
        t.close()


def test_shell_keeps_typed_ahead_input(host, tmp_path):
    """What a user types before the prompt is back (while a command runs) is kept, Ctrl-D included."""
    t = Terminal(host.sock, tmp_path)
    try:
        t.expect(PROMPT)
        # three commands and the end in one burst: the second and third arrive while the first runs
        t.type(b"query-status\rstop\rquery-status\r\x04")
        t.expect(b'"status": "running"')
        t.expect(b'"status": "paused"')
        assert t.wait_exit() == 0
    finally:
        t.close()
    t = Terminal(host.sock, tmp_path)
    try:
        t.expect(PROMPT)
        t.type(b"cont\r")
        t.expect(b'{"return": {}}')
        t.type(b"\x04")  # sent as soon as the reply shows, before the prompt is drawn again
        assert t.wait_exit() == 0
    finally:
        t.close()


class Tmux:
    """A program in a detached tmux session of its own server, read with capture-pane as a person sees it."""

    def __init__(self, tmp_path, command: str) -> None:
        self.args = ["tmux", "-L", f"mig-test-{os.getpid()}-{tmp_path.name}"]
        self.exit_file = tmp_path / "exit-status"
        # the shell around it keeps the pane (and the program's exit status) after the program ends
        subprocess.run([*self.args, "new-session", "-d", "-s", "t", "-x", "160", "-y", "60",
                        f"{command}; echo $? > {self.exit_file}; sleep 600"], check=True,
                       env=dict(os.environ, MIG_LOG_LEVEL="warning"))

    def screen(self) -> str:
        return subprocess.run([*self.args, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True,
                              check=True).stdout

    def wait_for(self, predicate, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            assert time.monotonic() < deadline, text
            time.sleep(0.2)

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.args, "send-keys", "-t", "t", *keys], check=True)

    def close(self) -> None:
        subprocess.run([*self.args, "kill-server"], capture_output=True)


async def test_mig_top_follows_a_migration_in_a_terminal(start_host, tmp_path):
    # a person's terminal: the test needs tmux (.ci/run installs it), and says so rather than pass unseen
    assert shutil.which("tmux") is not None, "mig top's terminal test needs tmux (apt-get install tmux)"
    wl = ("--ram", "32M", "--ram-fill", "random", "--dirty-rate", "1M")
    src = start_host(*wl, name="src")
    dst = start_host(*wl, "--incoming", "defer", "-S", name="dst")
    s, d = await connect(src.sock), await connect(dst.sock)
    term = Tmux(tmp_path, f"{sys.executable} -m mig_core top --interval 0.2 {src.sock} unix:{dst.sock}")
    try:
        term.wait_for(lambda t: t.count("status") >= 2 and "Ctrl-C quits" in t)  # both hosts, no migration yet
        await d.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
        # 8 MB/s: 32 MiB take four seconds, so the dashboard sees the migration running on any machine
        await s.execute("migrate-set-parameters", {"max-bandwidth": 8_000_000})
        await s.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})
        running = term.wait_for(lambda t: "active" in t and "MB/s" in t and "left" in t)
        assert "bandwidth" in running and "dirty rate" in running and "pass " in running
        await wait_for_status(s, {"completed"}, timeout=120)
        await wait_for_status(d, {"completed"})
        # the run states too (source after, destination -S): a refresh may show completed from query-migrate
        # beside the run state it read just before
        done = term.wait_for(lambda t: t.count("completed") >= 2 and "100.0 %" in t and "postmigrate" in t
                             and "paused" in t)
        assert "was " in done  # the downtime
        term.keys("C-c")
        deadline = time.monotonic() + 30
        while not term.exit_file.exists() or not term.exit_file.read_text().strip():
            assert time.monotonic() < deadline, term.screen()
            time.sleep(0.1)
        assert term.exit_file.read_text().strip() == "0"
        assert "Traceback" not in term.screen()
    finally:
        term.close()
        await s.disconnect()
        await d.disconnect()


def test_mig_top_once_shows_a_host_that_is_not_there(host, tmp_path):
    out = mig("top", "--once", str(host.sock), str(tmp_path / "nobody.sock"))
    assert out.returncode == 0, out.stderr
    assert "running" in out.stdout and "status" in out.stdout
    assert "disconnected" in out.stdout


def test_mig_top_renders_postcopy_colo_and_jobs():
    """The states a precopy test does not reach, from replies shaped as mig's (and QEMU's) are."""
    from rich.console import Console

    from mig_core.cli.top import HostView, sparkline

    view = HostView("unix:/x.sock", runstate="postmigrate")
    view.info = {"status": "postcopy-active", "ram": {"total": 100 << 20, "remaining": 25 << 20, "transferred": 80e6,
                                                      "dirty-sync-count": 3, "postcopy-requests": 12,
                                                      "postcopy-bytes": 5e6, "page-size": 4096},
                 "downtime": 7}
    view.colo = {"mode": "primary", "last-mode": "none", "reason": "none"}
    view.jobs = [{"id": "snap0", "type": "snapshot-save", "status": "running", "current-progress": 1,
                  "total-progress": 4}]
    view.error = "disconnected: [Errno 2] No such file or directory"
    console = Console(record=True, width=140)
    console.print(view.render())
    text = console.export_text()
    assert "postcopy-active" in text and "75.0 %" in text
    assert "12 page requests, 5.0 MB sent after the switch" in text
    assert "colo" in text and "primary (last none, none)" in text
    assert "snap0 (snapshot-save): running 25 %" in text
    assert "was 7 ms" in text and "disconnected: [Errno 2]" in text
    assert sparkline([0, 1, 2, 4, 8]) == "▁▂▃▅█" and sparkline([0, 0]) == "▁▁"
