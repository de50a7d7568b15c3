"""snapshot-save / snapshot-load / snapshot-delete as jobs, with QEMU's checks, texts and run states, and
mig's ``x-query-snapshots`` listing.

The checks run on the job (their failure is the job's error, as QEMU reports it), in QEMU's order. A save
stops the machine (run state save-vm) and reports through the source migration status (setup, then
completed or failed), a load stops it (restore-vm) and resumes the run state it had only on success; a
delete leaves the machine running. One snapshot job works at a time; others wait their turn.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Protocol

import structlog

from mig_core.control.jobs import Job, JobCancelled, JobRegistry
from mig_core.control.status import RUNNING_STATES, StatusMachine
from mig_core.engine.globalstate import GlobalState
from mig_core.engine.snapshot.ram import check_blocks, load_ram, save_ram, shapes
from mig_core.engine.snapshot.vmstate import read_device_state, save_device_state
from mig_core.errors import MigError, QMPError
from mig_core.ext.snapshot_backend import SnapshotBackend
from mig_core.machine.machine import Machine
from mig_core.schema.commands import SnapshotDeleteArgs, SnapshotLoadArgs, SnapshotSaveArgs
from mig_core.schema.common import RunState
from mig_core.schema.jobs import JobType
from mig_core.schema.migration import MigMode
from mig_core.schema.migration import MigrationCapability as C
from mig_core.schema.migration import MigrationStatus as S
from mig_core.schema.snapshots import XSnapshotInfo
from mig_core.stream.format import MAGIC

log = structlog.get_logger("mig.snapshot")

IN_PROGRESS = "There's a migration process in progress"


class SnapshotContext(Protocol):
    """What snapshot commands use of the manager."""

    machine: Machine
    source: StatusMachine
    destination: StatusMachine
    caps: dict[C, bool]
    jobs: JobRegistry
    global_state: GlobalState

    def parameter(self, name: str) -> object: ...

    def set_error(self, error: str) -> None: ...

    def begin_snapshot_status(self) -> None:
        """Move the source status to setup (a new migration id, no error) or raise IN_PROGRESS."""


class Snapshots:
    """The snapshot commands of one machine."""

    def __init__(self, ctx: SnapshotContext) -> None:
        self.ctx = ctx
        self._serial = threading.Lock()

    # -- the commands (return at once; the job does the work) ---------------------------

    def save(self, args: SnapshotSaveArgs) -> None:
        self.ctx.jobs.create(args.job_id, JobType.SNAPSHOT_SAVE, lambda job: self._serialised(job, self._save, args))

    def load(self, args: SnapshotLoadArgs) -> None:
        self.ctx.jobs.create(args.job_id, JobType.SNAPSHOT_LOAD, lambda job: self._serialised(job, self._load, args))

    def delete(self, args: SnapshotDeleteArgs) -> None:
        self.ctx.jobs.create(args.job_id, JobType.SNAPSHOT_DELETE,
                             lambda job: self._serialised(job, self._delete, args))

    def query(self) -> list[XSnapshotInfo]:
        out = []
        for name, node in self.ctx.machine.nodes.items():
            for s in node.list():
                out.append(XSnapshotInfo(node=name, backend=node.name, name=s.tag, vm_state_size=s.vm_state_size,
                                         date_sec=int(s.date), date_nsec=int((s.date % 1) * 1e9), size=s.size,
                                         ram_size=s.ram_size))
        return out

    def _serialised(self, job: Job, work: Callable[[Job, object], None], args: object) -> None:
        with self._serial:
            work(job, args)

    # -- checks shared by the three (QEMU's texts) ----------------------------------------

    def _nodes(self, devices: list[str]) -> list[SnapshotBackend]:
        if not devices:
            raise QMPError("At least one device is required for snapshot")
        out = []
        for name in devices:
            node = self.ctx.machine.nodes.get(name)
            if node is None:
                raise QMPError(f"No block device node '{name}'")
            out.append(node)
        return out

    def _vmstate_node(self, vmstate: str, devices: list[str]) -> SnapshotBackend:
        if vmstate not in devices:
            raise QMPError(f"vmstate block device '{vmstate}' does not exist")
        return self.ctx.machine.nodes[vmstate]

    def _no_multifd(self) -> None:
        if self.ctx.caps[C.MULTIFD]:
            raise QMPError("Snapshots are not compatible with multifd")

    def _not_incoming(self) -> None:
        if self.ctx.machine.run.state is RunState.INMIGRATE or self.ctx.destination.state in RUNNING_STATES:
            raise QMPError("Guest is waiting for an incoming migration")

    def _threads(self) -> int:
        value = self.ctx.parameter("multifd-channels")
        return value if isinstance(value, int) and value > 0 else 1

    # -- save --------------------------------------------------------------------------

    def _save(self, job: Job, args: object) -> None:
        assert isinstance(args, SnapshotSaveArgs)
        tag = args.tag
        self._no_multifd()
        blocked = self.ctx.machine.blockers.error(MigMode(self.ctx.parameter("mode")))
        if blocked is not None:
            raise QMPError(blocked)
        nodes = self._nodes(args.devices)
        if any(n.exists(tag) for n in nodes):
            raise QMPError(f"Snapshot '{tag}' already exists in one or more devices")
        vm_node = self._vmstate_node(args.vmstate, args.devices)
        self._not_incoming()
        if self.ctx.source.state in RUNNING_STATES:  # before stopping: a migration's run state is its own
            raise QMPError(IN_PROGRESS)
        run = self.ctx.machine.run
        before = run.set(RunState.SAVE_VM)  # stops the vCPUs (STOP if it ran)
        self.ctx.global_state.saved_runstate = before
        try:
            self.ctx.begin_snapshot_status()
            try:
                self._write(job, tag, vm_node, [n for n in nodes if n is not vm_node])
            except JobCancelled:
                self._end_status(S.CANCELLED, None)
                raise
            except (QMPError, MigError, OSError) as e:
                text = e.desc if isinstance(e, QMPError) else str(e)
                self._end_status(S.FAILED, f"Error while writing VM state: {text}")
                raise
            except BaseException as e:
                self._end_status(S.FAILED, f"Error while writing VM state: internal error: {type(e).__name__}: {e}")
                raise
            self._end_status(S.COMPLETED, None)
        finally:
            run.set(before)  # the run state it had (RESUME if it ran)

    def _end_status(self, new: S, error: str | None) -> None:
        src = self.ctx.source
        if src.state is S.SETUP and new is S.CANCELLED:  # job-cancel
            src.cas(S.SETUP, S.CANCELLING)
        if src.state is S.CANCELLING:  # job-cancel, or migrate_cancel during the save
            src.cas(S.CANCELLING, S.CANCELLED)
            return
        if error is not None:
            self.ctx.set_error(error)
        src.cas(S.SETUP, new)

    def _checkpoint(self, job: Job) -> Callable[[], None]:
        def check() -> None:
            job.checkpoint()
            if self.ctx.source.state is S.CANCELLING:
                raise JobCancelled()
        return check

    def _write(self, job: Job, tag: str, vm_node: SnapshotBackend, others: list[SnapshotBackend]) -> None:
        machine = self.ctx.machine
        writer = vm_node.begin(tag, shapes(machine))
        try:
            save_ram(machine, writer, self._threads(), self._checkpoint(job), job.progress)
            writer.put_vmstate(save_device_state(machine))
            self._checkpoint(job)()
            info = writer.commit()
        except BaseException:
            writer.abandon()
            raise
        log.info("snapshot_saved", tag=tag, node=vm_node.node_name, vm_state_size=info.vm_state_size, size=info.size)
        created: list[SnapshotBackend] = [vm_node]
        for node in others:  # the other devices get the tag with no VM state (a disk-only snapshot there)
            try:
                w = node.begin(tag, [])
                w.put_vmstate(b"")
                w.commit()
            except (MigError, OSError) as e:
                for done in created:
                    done.delete(tag)
                raise QMPError(f"Could not create snapshot '{tag}' on '{node.node_name}': {e}") from None
            created.append(node)

    # -- load --------------------------------------------------------------------------

    def _load(self, job: Job, args: object) -> None:
        assert isinstance(args, SnapshotLoadArgs)
        tag = args.tag
        self._not_incoming()
        if self.ctx.source.state in RUNNING_STATES:
            raise QMPError(IN_PROGRESS)
        run = self.ctx.machine.run
        before = run.set(RunState.RESTORE_VM)  # QEMU stops first; a failure leaves the machine stopped
        self._no_multifd()
        nodes = self._nodes(args.devices)
        if not all(n.exists(tag) for n in nodes):
            raise QMPError(f"Snapshot '{tag}' does not exist in one or more devices")
        vm_node = self._vmstate_node(args.vmstate, args.devices)
        try:
            reader = vm_node.open(tag)
        except KeyError:
            raise QMPError("Snapshot can not be found") from None
        try:
            saved = reader.blocks()
            if not saved:
                raise QMPError("This is a disk-only snapshot. Revert to it  offline using qemu-img")
            machine = self.ctx.machine
            try:  # everything is checked before RAM or a device changes
                check_blocks(machine, saved)
                devices = read_device_state(machine, reader.vmstate())
            except MigError as e:
                raise QMPError(f"Error {e} while loading VM state") from None
            load_ram(machine, reader, self._threads(), self._checkpoint(job), job.progress)
            devices.apply()
            for b in machine.blocks:  # a host that reports its writes never wrote these: tell its tracker
                machine.mark_dirty(b.name, 0, b.size)
        finally:
            reader.close()
        log.info("snapshot_loaded", tag=tag, node=vm_node.node_name)
        run.set(before)

    # -- delete ------------------------------------------------------------------------

    def _delete(self, job: Job, args: object) -> None:
        assert isinstance(args, SnapshotDeleteArgs)
        for node in self._nodes(args.devices):
            if not node.exists(args.tag):
                continue
            try:
                node.delete(args.tag)
            except (MigError, OSError, KeyError) as e:
                raise QMPError(f"Could not delete snapshot '{args.tag}' on '{node.node_name}': {e}") from None
        log.info("snapshot_deleted", tag=args.tag, devices=args.devices)

    # -- device state alone: xen-save-devices-state / xen-load-devices-state ------------------

    def save_devices_file(self, filename: str, live: bool) -> None:
        """Every device's state (no RAM) to ``filename``; the machine stops meanwhile and runs again after.

        ``live`` (QEMU: the save is part of a live migration, so block devices are inactivated when the
        machine was not running) has nothing to act on until mig has block nodes."""
        run = self.ctx.machine.run
        was_running = run.running
        if was_running:
            run.set(RunState.SAVE_VM)
        self.ctx.global_state.saved_runstate = RunState.RUNNING  # QEMU's global_state_store_running
        try:
            try:
                fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o660)
            except (OSError, ValueError) as e:
                raise QMPError(f"Unable to open {filename}: {_reason(e)}") from None
            try:
                data = save_device_state(self.ctx.machine)
                with os.fdopen(fd, "wb") as f:
                    fd = -1
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except (OSError, MigError) as e:
                raise QMPError(f"saving Xen device state failed: {e}") from None
            finally:
                if fd >= 0:
                    os.close(fd)
            log.info("device_state_saved", filename=filename, bytes=len(data), live=live)
        finally:
            if was_running:
                run.set(RunState.RUNNING)

    def load_devices_file(self, filename: str) -> None:
        """Every device's state from ``filename`` (RAM stays as it is); only while the machine is stopped,
        and it stays stopped (restore-vm) after, as QEMU."""
        run = self.ctx.machine.run
        if run.running:
            raise QMPError("Cannot update device state while vm is running")
        if self.ctx.source.state in RUNNING_STATES or self.ctx.destination.state in RUNNING_STATES:
            raise QMPError(IN_PROGRESS)
        run.set(RunState.RESTORE_VM)
        data = _read_device_state_file(filename)
        try:
            read_device_state(self.ctx.machine, data).apply()
        except MigError as e:
            raise QMPError(f"loading Xen device state failed: {e}") from None
        log.info("device_state_loaded", filename=filename, bytes=len(data))


def _reason(e: Exception) -> str:
    return e.strerror or str(e) if isinstance(e, OSError) else "Invalid argument"


#: A device-state file larger than this is refused (device state is small; a file this large is not one).
MAX_DEVICE_STATE_FILE = 256 << 20


def _read_device_state_file(filename: str) -> bytes:
    """The file's bytes, read without waiting (a FIFO) and never past what a device-state file can be
    (a device such as /dev/zero never ends); QMPError otherwise."""
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        raise QMPError(f"Unable to open {filename}: {_reason(e)}") from None
    try:
        head = os.read(fd, len(MAGIC))
        if head != MAGIC:
            raise QMPError(f"loading Xen device state failed: {filename} is not a mig device-state file "
                           f"(it starts with {head!r})")
        chunks = [head]
        size = len(head)
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_DEVICE_STATE_FILE:
                raise QMPError(f"loading Xen device state failed: {filename} is larger than "
                               f"{MAX_DEVICE_STATE_FILE >> 20} MiB")
            chunks.append(chunk)
        return b"".join(chunks)
    except BlockingIOError:
        raise QMPError(f"loading Xen device state failed: {filename} has nothing to read now "
                       "(a FIFO or a device, not a file)") from None
    except OSError as e:
        raise QMPError(f"loading Xen device state failed: {_reason(e)}") from None
    finally:
        os.close(fd)
