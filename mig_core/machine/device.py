"""Devices: state that migrates beside RAM, with a contract shaped like QEMU's SaveVMHandlers.

A device registers an id, an instance number and a version, and overrides
what it needs of the callbacks below; each says which thread calls it and
whether the vCPUs run meanwhile. Small devices implement only
``save_state``/``load_state`` (encoded with msgpack). A device with large
state streams it while the program runs: the engine asks ``state_pending()``
after every dirty sync, calls ``save_iterate`` in every pass while the device
has pending bytes, counts those bytes in the expected downtime and in the
switchover decision (like RAM that is still dirty), and calls ``save_state``
once the vCPUs are stopped. A loader refuses state from a newer version than
it knows, or older than it still loads.

A device declares the shape of its state in ``state_type`` (a msgspec type: a
Struct, a TypedDict, ``dict[str, int]`` …); state from the stream is validated
against it before ``load_state`` sees any of it, and a mismatch is refused with
the device and the field named (``device 'counter' instance 0: invalid state:
Expected `int`, got `str` - at `$.ticks```). The destination validates every
device's state first and applies them only when all are good.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import msgspec
import structlog

from mig_core.errors import DeviceStateError

log = structlog.get_logger("mig.device")


@dataclass(frozen=True)
class PendingState:
    """A device's state still to be sent, split as QEMU splits it (``state_pending_estimate``).

    ``must_precopy`` bytes have to reach the destination before it may run; ``can_postcopy`` bytes may
    follow after a switch to postcopy. Without postcopy both count toward the switchover decision.
    """

    must_precopy: int = 0
    can_postcopy: int = 0

    @property
    def total(self) -> int:
        return self.must_precopy + self.can_postcopy


class Device:
    """Base of a migratable device; override what the device needs (QEMU's SaveVMHandlers)."""

    #: Unique name of the device model or instance (QEMU's idstr).
    id: str = ""
    #: Distinguishes several devices with the same id.
    instance: int = 0
    #: Version of the state this code saves.
    version: int = 1
    #: Oldest version this code can still load.
    minimum_version: int = 1
    #: The shape of the state ``load_state`` takes (a msgspec type), checked before it is called;
    #: None: any msgpack value (``load_state`` must then check it; what it raises is reported as a
    #: refusal of the device's state).
    state_type: ClassVar[Any] = None
    #: True for a device whose state cannot migrate at all (QEMU's unmigratable vmsd): while it is
    #: registered, migrate and snapshot-save are refused naming it.
    unmigratable: ClassVar[bool] = False
    #: True for a device that streams its own state as a VFIO device does: its bytes (iterative chunks and
    #: final state) are query-migrate's ``vfio`` statistics (shown only when such a device is registered).
    vfio: ClassVar[bool] = False

    # -- source ------------------------------------------------------------------

    def save_setup(self) -> None:
        """Before the first pass: prepare to stream (QEMU's save_setup).

        Migration thread; vCPUs running."""

    def state_pending(self) -> PendingState:
        """How much iterative state is still to be sent (QEMU's state_pending_estimate).

        Migration thread, after each dirty sync; vCPUs running. Counted in expected-downtime and in the
        switchover decision; a device whose pending bytes never fall keeps the migration from converging,
        exactly like RAM dirtied faster than it is sent."""
        return PendingState()

    def save_iterate(self, max_bytes: int) -> bytes | None:
        """The next chunk of iterative state, at most ``max_bytes``; None: nothing more this pass.

        Migration thread, in every pass while ``state_pending()`` reported bytes (a pass asks for at most
        what was pending at its start, so a device that keeps changing cannot hold a pass forever); vCPUs
        running. The destination's ``load_iterate`` gets each chunk, in order."""
        return None

    def save_state(self) -> Any:
        """The device's complete remaining state, msgpack-serialisable (QEMU's save_live_complete_precopy).

        Migration thread; vCPUs stopped (run state finish-migrate), so nothing changes any more."""
        return None

    def save_complete_postcopy(self) -> Any:
        """The ``can_postcopy`` remainder at the end of a postcopy migration (QEMU's
        save_live_complete_postcopy).

        Called by the postcopy engine once it exists; precopy never calls it (its ``save_state`` is complete).
        Migration thread; vCPUs running on the destination."""
        return None

    def unplug_before_migration(self) -> bool:
        """Start removing what must be gone before the source may go (QEMU's failover primary NIC, which
        the guest unplugs); True if the migration must wait in ``wait-unplug`` until ``unplug_pending()``
        is False.

        Migration thread, in setup; vCPUs running."""
        return False

    def unplug_pending(self) -> bool:
        """True while the removal started by ``unplug_before_migration`` is still under way.

        Migration thread, every 250 ms in ``wait-unplug``; vCPUs running. When it turns False the
        source emits UNPLUG_PRIMARY with this device's id."""
        return False

    def replug(self) -> None:
        """Put back what ``unplug_before_migration`` removed: the migration failed or was cancelled.

        Migration thread, before the status reaches failed or cancelled; vCPUs running."""

    def save_cleanup(self) -> None:
        """After the migration ended, however it ended.

        Migration thread; vCPUs running again unless the migration completed."""

    # -- destination -------------------------------------------------------------------

    def load_setup(self) -> None:
        """Before any state arrives.

        Destination's load thread; the machine is not running (inmigrate)."""

    def switchover_ack_needed(self, approve: Callable[[], None]) -> bool:
        """With ``switchover-ack`` on: True if the source must not stop until this device calls ``approve()``.

        Destination's load thread, after ``load_setup``, when the return path opens. ``approve`` may be
        called once from any thread when the device is ready (for instance, it loaded a large initial
        state); meanwhile the source keeps iterating (QEMU's switchover_ack_needed)."""
        return False

    def load_iterate(self, chunk: bytes) -> None:
        """A chunk produced by the source's ``save_iterate``, in the order it was produced.

        Destination's load thread; the machine is not running."""

    def load_state(self, state: Any, version: int) -> None:
        """The final state saved by a source of ``version`` (already checked to be loadable and of
        ``state_type``); applied only once every device's final state has arrived and validated.

        Destination's load thread; the machine is not running."""

    def load_cleanup(self) -> None:
        """After loading ended, however it ended.

        Destination's load thread; before the machine starts."""


@dataclass(frozen=True)
class DeviceSection:
    """One device's state as it travels: who it is, which version, and the msgpack payload."""

    id: str
    instance: int
    version: int
    payload: bytes


def _key(dev_id: str, instance: int) -> str:
    return f"'{dev_id}' instance {instance}"


class DeviceRegistry:
    """The devices of one machine, in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[tuple[str, int], Device] = {}

    def register(self, dev: Device) -> None:
        if not dev.id:
            raise ValueError("a device needs a non-empty id")
        if not 1 <= dev.minimum_version <= dev.version:
            raise ValueError(f"device {_key(dev.id, dev.instance)}: versions must satisfy 1 <= minimum_version "
                             f"({dev.minimum_version}) <= version ({dev.version})")
        with self._lock:
            if (dev.id, dev.instance) in self._devices:
                raise ValueError(f"device {_key(dev.id, dev.instance)} is already registered")
            self._devices[(dev.id, dev.instance)] = dev

    def unregister(self, dev: Device) -> None:
        with self._lock:
            self._devices.pop((dev.id, dev.instance), None)

    def __iter__(self):  # type: ignore[no-untyped-def]
        with self._lock:
            return iter(list(self._devices.values()))

    def __len__(self) -> int:
        return len(self._devices)

    def get(self, dev_id: str, instance: int) -> Device | None:
        return self._devices.get((dev_id, instance))

    # -- saving ----------------------------------------------------------------

    def save(self, dev: Device) -> DeviceSection:
        """The final state of one device as a section."""
        try:
            payload = msgpack.packb(dev.save_state(), use_bin_type=True)
        except (TypeError, ValueError) as e:
            raise DeviceStateError(f"device {_key(dev.id, dev.instance)}: state cannot be encoded: {e}") from None
        return DeviceSection(dev.id, dev.instance, dev.version, payload)

    def save_all(self) -> list[DeviceSection]:
        return [self.save(d) for d in self]

    # -- loading -----------------------------------------------------------------

    def lookup(self, dev_id: str, instance: int, version: int) -> Device:
        """The device that will load a section, after the version check."""
        dev = self.get(dev_id, instance)
        if dev is None:
            raise DeviceStateError(f"the stream has state for device {_key(dev_id, instance)}, "
                                   "which this host does not have")
        if version > dev.version:
            raise DeviceStateError(f"device {_key(dev_id, instance)}: the stream has version {version}, newer than "
                                   f"this host's version {dev.version}")
        if version < dev.minimum_version:
            raise DeviceStateError(f"device {_key(dev_id, instance)}: the stream has version {version}, older than "
                                   f"the oldest this host loads ({dev.minimum_version})")
        return dev

    def decode(self, section: DeviceSection) -> tuple[Device, Any]:
        """The device for a section and its state, validated against the device's ``state_type``."""
        dev = self.lookup(section.id, section.instance, section.version)
        where = f"device {_key(section.id, section.instance)}"
        if dev.state_type is not None:
            try:
                return dev, msgspec.msgpack.decode(section.payload, type=dev.state_type)
            except msgspec.ValidationError as e:
                raise DeviceStateError(f"{where}: invalid state: {e}") from None
            except msgspec.DecodeError as e:
                raise DeviceStateError(f"{where}: corrupt state: {e}") from None
        try:
            return dev, msgpack.unpackb(section.payload, raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException) as e:  # TypeError: a map keyed by a list
            raise DeviceStateError(f"{where}: corrupt state: {e}") from None

    @staticmethod
    def apply(dev: Device, state: Any, version: int) -> None:
        """``load_state``; what a device raises about the state it was given is a refusal, named so."""
        try:
            dev.load_state(state, version)
        except DeviceStateError:
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise DeviceStateError(f"device {_key(dev.id, dev.instance)} refused its state: "
                                   f"{type(e).__name__}: {e}") from None

    def load(self, section: DeviceSection) -> None:
        """Validate and apply one device's state."""
        dev, state = self.decode(section)
        self.apply(dev, state, section.version)

    def pending(self) -> PendingStates:
        """A collector for one load: each section validated as it comes, all applied together."""
        return PendingStates(self)

    # -- buffered form (COLO checkpoints) --------------------------------------------------

    def save_to_buffer(self) -> bytes:
        """Every device's state in one buffer, to be applied all at once later."""
        return msgpack.packb([[s.id, s.instance, s.version, s.payload] for s in self.save_all()], use_bin_type=True)

    def load_from_buffer(self, buf: bytes) -> None:
        """Check every section of a buffer first, then apply them all: a bad buffer changes nothing."""
        self.stage_buffer(buf).apply(require_all=False)

    def stage_buffer(self, buf: bytes) -> PendingStates:
        """Every section of a buffer decoded and checked, ready to apply (``apply(require_all=False)``)."""
        try:
            raw = msgpack.unpackb(buf, raw=False)
            sections = [DeviceSection(str(i), int(n), int(v), bytes(p)) for i, n, v, p in raw]
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            raise DeviceStateError(f"corrupt device state buffer: {e}") from None
        pending = self.pending()
        for s in sections:
            pending.add(s)
        return pending


class PendingStates:
    """Device states of one load, decoded and validated as they arrive and applied only once all of them
    are good: a bad or missing section anywhere leaves every device as it was."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry
        self._states: dict[tuple[str, int], tuple[Device, Any, int]] = {}

    def add(self, section: DeviceSection) -> None:
        key = (section.id, section.instance)
        if key in self._states:
            raise DeviceStateError(f"the stream carries state for device {_key(*key)} twice")
        dev, state = self.registry.decode(section)
        self._states[key] = (dev, state, section.version)

    def check_complete(self) -> None:
        """Every registered device has had its state; DeviceStateError naming the first that has not."""
        missing = [_key(d.id, d.instance) for d in self.registry if (d.id, d.instance) not in self._states]
        if missing:
            raise DeviceStateError(f"the stream carried no state for device {missing[0]}")

    def apply(self, require_all: bool = True) -> None:
        """``require_all``: every registered device must have had its state (a migration's end)."""
        if require_all:
            self.check_complete()
        for dev, state, version in self._states.values():
            self.registry.apply(dev, state, version)
