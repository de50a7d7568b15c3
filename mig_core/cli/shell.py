"""``mig shell``: an interactive QMP shell with history, completion and live events (prompt_toolkit)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, cast

import click
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.history import FileHistory
from prompt_toolkit.input import create_input
from prompt_toolkit.patch_stdout import patch_stdout
from qemu.qmp import ExecuteError, QMPClient

from mig_core.cli.operator import _arguments, connect_monitor
from mig_core.qapi import FlatUnion, members_of
from mig_core.schema.commands import COMMANDS


def argument_names(command: str) -> list[str]:
    """The argument names a command declares (from the schema, not hand-kept lists)."""
    cmd = COMMANDS.get(command)
    if cmd is None or cmd.args is None or issubclass(cmd.args, FlatUnion):
        return []
    return [m.name for m in members_of(cmd.args)]


class QMPCompleter(Completer):
    """Completes command names first, then ``name=`` for the command's arguments."""

    def __init__(self, commands: list[str]) -> None:
        self.commands = sorted(commands)

    def get_completions(self, document: Any, complete_event: Any):  # type: ignore[no-untyped-def]
        text = document.text_before_cursor
        words = text.split()
        if not words or (len(words) == 1 and not text.endswith(" ")):
            prefix = words[0] if words else ""
            for c in self.commands:
                if c.startswith(prefix):
                    yield Completion(c, start_position=-len(prefix))
            return
        prefix = "" if text.endswith(" ") else words[-1]
        used = {w.split("=", 1)[0] for w in words[1:]}
        for name in argument_names(words[0]):
            if name.startswith(prefix) and name not in used:
                yield Completion(f"{name}=", start_position=-len(prefix))


def parse_line(line: str) -> tuple[str, dict[str, Any]]:
    """``command key=value ...`` or ``command {json}``."""
    line = line.strip()
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if rest.startswith("{"):
        return name, _arguments((rest,))
    # posix=False keeps the quotes inside JSON values such as capabilities=[{...}]
    return name, _arguments(tuple(shlex.split(rest, posix=False)))


def _say(text: str) -> None:
    """A reply, written before the next prompt starts. Through patch_stdout it could be written while that
    prompt runs, and prompt_toolkit writes such output with the terminal in cooked mode: a Ctrl-D typed in
    that moment became an end-of-file for the line discipline, and the shell never saw it (it hung)."""
    out = sys.__stdout__
    assert out is not None
    out.write(text + "\n")
    out.flush()


async def _shell(socket: str) -> None:
    client: QMPClient = await connect_monitor(socket)
    names = [c["name"] for c in cast(list[dict[str, str]], await client.execute("query-commands"))]
    terminal = create_input()
    session: PromptSession[str] = PromptSession(
        history=FileHistory(os.environ.get("MIG_SHELL_HISTORY", str(Path.home() / ".mig_shell_history"))),
        completer=QMPCompleter(names),
        input=terminal,
    )

    async def print_events() -> None:
        async for ev in client.events:
            print(json.dumps(dict(ev)))

    events = asyncio.create_task(print_events())
    # The terminal stays in raw mode between prompts too: what is typed while a command runs waits,
    # byte for byte, for the next prompt. In cooked mode the line discipline would take it first and
    # turn a Ctrl-D into an end-of-file that the next prompt never sees.
    raw = terminal.raw_mode() if sys.stdin.isatty() else contextlib.nullcontext()
    try:
        with raw, patch_stdout():
            while True:
                try:
                    line = await session.prompt_async("(mig) ")
                except (EOFError, KeyboardInterrupt):
                    break
                if not line.strip():
                    continue
                try:
                    name, args = parse_line(line)
                except (click.BadParameter, ValueError) as e:
                    _say(f"error: {e}")
                    continue
                try:
                    reply = await client.execute(name, args or None)
                    _say(json.dumps({"return": reply}))
                except ExecuteError as e:
                    _say(json.dumps({"error": {"class": e.error.error.class_, "desc": e.error.error.desc}}))
                except Exception as e:  # noqa: BLE001 - the connection may end (quit)
                    _say(f"connection closed: {e}")
                    break
    finally:
        events.cancel()
        with contextlib.suppress(Exception):
            await client.disconnect()


@click.command("shell")
@click.argument("socket")
def shell_cmd(socket: str) -> None:
    """Interactive QMP shell: history, tab completion of commands and arguments, events as they arrive."""
    asyncio.run(_shell(socket))
