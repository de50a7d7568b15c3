"""The ``globalstate`` device: carries the source's run state so the destination can follow it."""

from __future__ import annotations

from typing import Any

from mig_core.machine.device import Device
from mig_core.schema.common import RunState


class GlobalState(Device):
    """Saved on the source just before it stops; loaded on the destination before it decides to run."""

    id = "globalstate"
    version = 1

    def __init__(self) -> None:
        self.saved_runstate: RunState | None = None
        self.received_runstate: RunState | None = None

    def save_state(self) -> Any:
        return {"runstate": (self.saved_runstate or RunState.RUNNING).value}

    def load_state(self, state: Any, version: int) -> None:
        try:
            self.received_runstate = RunState(state["runstate"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"globalstate carries an unknown run state: {state!r}") from None
