"""The ``globalstate`` device: carries the source's run state so the destination can follow it."""

from __future__ import annotations

from typing import Any

import msgspec

from mig_core.machine.device import Device
from mig_core.schema.common import RunState


class GlobalStateV1(msgspec.Struct, forbid_unknown_fields=True):
    """What a version-1 globalstate section holds."""

    runstate: RunState


class GlobalState(Device):
    """Saved on the source just before it stops; loaded on the destination before it decides to run."""

    id = "globalstate"
    version = 1
    state_type = GlobalStateV1

    def __init__(self) -> None:
        self.saved_runstate: RunState | None = None
        self.received_runstate: RunState | None = None

    def save_state(self) -> Any:
        return {"runstate": (self.saved_runstate or RunState.RUNNING).value}

    def load_state(self, state: GlobalStateV1, version: int) -> None:
        self.received_runstate = state.runstate
