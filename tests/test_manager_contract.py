"""Every QMP command of the schema maps to a manager method whose signature takes what the command declares."""

from __future__ import annotations

import inspect

from mig_core.control.manager import MigrationManager
from mig_core.qmp.dispatch import SESSION_COMMANDS
from mig_core.schema.commands import COMMANDS

#: Declared in the schema, answered with CommandNotFound until their machinery lands (docs/qmp-reference.md).
NOT_SERVED_YET: set[str] = set()
#: Commands whose handler also receives the session's passed descriptors.
SESSION_FD_COMMANDS = {"getfd", "closefd"}


def test_every_command_has_a_handler_with_the_declared_arguments():
    served = {n for n in COMMANDS if callable(getattr(MigrationManager, COMMANDS[n].method, None))}
    assert set(COMMANDS) - served - SESSION_COMMANDS == NOT_SERVED_YET
    for name in sorted(served):
        cmd = COMMANDS[name]
        params = list(inspect.signature(getattr(MigrationManager, cmd.method)).parameters.values())[1:]  # self
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        expected = 0 if cmd.args is None else 1
        extra = ["session_fds"] if name in SESSION_FD_COMMANDS else []
        assert [p.name for p in positional][expected:] == extra, (name, [p.name for p in params])
        assert len(positional) == expected + len(extra), (name, [p.name for p in params])
        assert all(p.default is inspect.Parameter.empty for p in positional), name
