"""switchover-ack on the destination: collect each device's approval, then tell the source once.

Devices that need time on the destination before the source may stop (a large initial state to load,
a device to warm up) say so when the return path opens; each approves once, from any thread. When the
last one has approved (at once if none needs to), the destination sends SWITCHOVER_ACK and the source's
switchover decision may go ahead (QEMU's switchover_ack_pending_num and qemu_loadvm_approve_switchover).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import structlog

from mig_core.engine.return_path import SwitchoverAck
from mig_core.machine.device import Device

log = structlog.get_logger("mig.switchover_ack")


class SwitchoverApprovals:
    """The devices still to approve the switchover; sends the ack when none is left."""

    def __init__(self, send: Callable[[SwitchoverAck], None]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._waiting: set[str] = set()
        self._sent = False

    def start(self, devices: Iterable[Device]) -> None:
        """Ask each device whether it needs to approve; ack at once if none does."""
        for dev in devices:
            key = f"{dev.id}/{dev.instance}"
            with self._lock:
                self._waiting.add(key)
            if not dev.switchover_ack_needed(self._approver(key)):
                with self._lock:
                    self._waiting.discard(key)
        log.info("switchover_ack_waiting", devices=sorted(self._waiting))
        self._maybe_send()

    @property
    def waiting(self) -> list[str]:
        """The devices (``id/instance``) that have not approved yet."""
        with self._lock:
            return sorted(self._waiting)

    def _approver(self, key: str) -> Callable[[], None]:
        def approve() -> None:
            with self._lock:
                self._waiting.discard(key)
            log.info("switchover_approved", device=key)
            self._maybe_send()
        return approve

    def _maybe_send(self) -> None:
        with self._lock:
            if self._waiting or self._sent:
                return
            self._sent = True
        self._send(SwitchoverAck())
        log.info("switchover_ack_sent")
