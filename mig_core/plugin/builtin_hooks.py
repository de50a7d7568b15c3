"""mig's own hook implementations: structured logs of status changes, events and announces."""

from __future__ import annotations

from typing import Any

import structlog

from mig_core.plugin.hookspecs import hookimpl

log = structlog.get_logger("mig")


@hookimpl
def mig_status_changed(side: Any, old: Any, new: Any, migration_id: str) -> None:
    log.info("migration_status", side=side.value, old=old.value, new=new.value, migration_id=migration_id)


@hookimpl
def mig_announce(round: int, rounds: int) -> None:
    log.info("announce", round=round, rounds=rounds)
