"""From a parsed QMP request to a reply: request checks, argument visiting, the manager call.

Mirrors QEMU's qmp_dispatch: the request object is checked first (its members
and their types), then the command is looked up, then its arguments are
visited against the declared type, then the handler runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mig_core.errors import QMPError, command_not_found
from mig_core.qapi import QapiInputError, from_qmp, to_qmp
from mig_core.schema.commands import COMMANDS, Command

#: Commands the QMP session answers itself (they concern the connection, not the machine).
SESSION_COMMANDS = frozenset({"qmp_capabilities", "query-commands"})


@dataclass
class Request:
    """A checked request: the command name, whether it is out-of-band, its id and raw arguments."""

    name: str
    oob: bool
    id: Any
    has_id: bool
    arguments: dict[str, Any]


def check_request(obj: Any, oob_enabled: bool) -> Request:
    """Validate the request envelope as QEMU does; raise QMPError with QEMU's wording."""
    if not isinstance(obj, dict):
        raise QMPError("QMP input must be a JSON object")
    exec_key = None
    for key, value in obj.items():
        if key == "execute" or (key == "exec-oob" and oob_enabled):
            if not isinstance(value, str):
                raise QMPError(f"QMP input member '{key}' must be a string")
            if exec_key is not None:
                raise QMPError("QMP input must not have both 'execute' and 'exec-oob'")
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key == "id":
            continue
        else:
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if exec_key is None:
        raise QMPError("QMP input lacks member 'execute'")
    return Request(obj[exec_key], exec_key == "exec-oob", obj.get("id"), "id" in obj, obj.get("arguments", {}))


def available_commands(manager: Any) -> list[Command]:
    """Declared commands that have a handler: the session's own or a manager method."""
    return [c for c in COMMANDS.values() if c.name in SESSION_COMMANDS or callable(getattr(manager, c.method, None))]


def find_command(manager: Any, req: Request) -> Command:
    cmd = COMMANDS.get(req.name)
    if cmd is None or (cmd.name not in SESSION_COMMANDS and not callable(getattr(manager, cmd.method, None))):
        raise command_not_found(f"The command {req.name} has not been found")
    if req.oob and not cmd.allow_oob:
        raise QMPError(f"The command {req.name} does not support OOB")
    return cmd


def visit_arguments(cmd: Command, arguments: dict[str, Any]) -> Any:
    """The typed arguments of a command, or QMPError with QEMU's visitor message."""
    try:
        if cmd.args is None:
            for key in arguments:
                raise QapiInputError(f"Parameter '{key}' is unexpected")
            return None
        return from_qmp(cmd.args, arguments)
    except QapiInputError as e:
        raise QMPError(str(e)) from None


def call_manager(manager: Any, cmd: Command, args: Any, extra: dict[str, Any] | None = None) -> Any:
    """Run the manager method for ``cmd`` and encode its result as the QMP ``return`` value."""
    method = getattr(manager, cmd.method)
    kwargs = extra or {}
    result = method(**kwargs) if args is None else method(args, **kwargs)
    if result is None:
        return {}
    return to_qmp(result)
