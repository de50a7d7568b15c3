"""QEMU's job layer: long-running operations (snapshot-save/-load/-delete first) as jobs with a status,
verbs allowed per status, JOB_STATUS_CHANGE events, progress and the error they ended with.

A job's work runs on a thread of its own and calls ``Job.checkpoint()`` between steps: that is where a
``job-pause`` takes effect (status ``paused`` until ``job-resume``) and where ``job-cancel`` ends it.
Jobs are auto-finalized and dismissed by hand (``job-dismiss``), as QEMU's snapshot jobs are.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import structlog

from mig_core.errors import MigError, QMPError
from mig_core.schema.jobs import JobInfo, JobStatus, JobStatusChangeEventData, JobType, JobVerb

log = structlog.get_logger("mig.jobs")

St = JobStatus

#: Which status may follow which (QEMU's JobSTT).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    St.UNDEFINED: frozenset({St.CREATED}),
    St.CREATED: frozenset({St.RUNNING, St.ABORTING, St.NULL}),
    St.RUNNING: frozenset({St.PAUSED, St.READY, St.WAITING, St.ABORTING}),
    St.PAUSED: frozenset({St.RUNNING}),
    St.READY: frozenset({St.STANDBY, St.WAITING, St.ABORTING}),
    St.STANDBY: frozenset({St.READY}),
    St.WAITING: frozenset({St.PENDING, St.ABORTING}),
    St.PENDING: frozenset({St.ABORTING, St.CONCLUDED}),
    St.ABORTING: frozenset({St.ABORTING, St.CONCLUDED}),
    St.CONCLUDED: frozenset({St.NULL}),
    St.NULL: frozenset(),
}

_ACTIVE = frozenset({St.CREATED, St.RUNNING, St.PAUSED, St.READY, St.STANDBY})

#: In which statuses each verb is accepted (QEMU's JobVerbTable).
VERBS: dict[JobVerb, frozenset[JobStatus]] = {
    JobVerb.CANCEL: _ACTIVE | {St.WAITING, St.PENDING},
    JobVerb.PAUSE: _ACTIVE,
    JobVerb.RESUME: _ACTIVE,
    JobVerb.SET_SPEED: _ACTIVE,
    JobVerb.COMPLETE: frozenset({St.READY, St.STANDBY}),
    JobVerb.FINALIZE: frozenset({St.PENDING}),
    JobVerb.DISMISS: frozenset({St.CONCLUDED}),
    JobVerb.CHANGE: _ACTIVE,
}

#: QEMU's id_wellformed: a letter first, then letters, digits, '-', '.', '_'.
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")

#: What a cancelled job's error says (strerror(ECANCELED), as QEMU reports it).
CANCELLED_TEXT = "Operation canceled"


class JobCancelled(Exception):
    """Raised from ``Job.checkpoint()`` in a job that ``job-cancel`` ended."""


class Job:
    """One job: its identity, status, progress and error; the work drives it through ``checkpoint``."""

    def __init__(self, job_id: str, job_type: JobType, emit: Callable[[str, Any], None]) -> None:
        self.id = job_id
        self.type = job_type
        self.status = St.UNDEFINED
        self.current_progress = 0
        self.total_progress = 1
        self.error: str | None = None
        self._emit = emit
        self._cond = threading.Condition()
        self._user_paused = False
        self._cancelled = False
        self.thread: threading.Thread | None = None

    # -- for the work -----------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def progress(self, current: int, total: int) -> None:
        """Report how far the work is (query-jobs' current-progress / total-progress)."""
        self.current_progress, self.total_progress = current, max(total, current, 1)

    def checkpoint(self) -> None:
        """A point where the work may stop: waits here while paused; raises JobCancelled once cancelled."""
        with self._cond:
            if self._user_paused and not self._cancelled:
                self._transition(St.PAUSED)
                while self._user_paused and not self._cancelled:
                    self._cond.wait()
                self._transition(St.RUNNING)
            if self._cancelled:
                raise JobCancelled()

    # -- status ----------------------------------------------------------------------

    def _transition(self, new: JobStatus) -> None:
        with self._cond:
            old = self.status
            if new not in TRANSITIONS[old]:
                raise AssertionError(f"job {self.id}: no transition {old.value} -> {new.value}")
            self.status = new
        log.info("job_status", job=self.id, type=self.type.value, old=old.value, new=new.value)
        if old is not new:
            self._emit("JOB_STATUS_CHANGE", JobStatusChangeEventData(id=self.id, status=new))

    def check_verb(self, verb: JobVerb) -> None:
        """QEMU's refusal of a verb the job's status does not accept."""
        if self.status not in VERBS[verb]:
            raise QMPError(f"Job '{self.id}' in state '{self.status.value}' cannot accept command verb "
                           f"'{verb.value}'")

    def info(self) -> JobInfo:
        info = JobInfo(id=self.id, type=self.type, status=self.status, current_progress=self.current_progress,
                       total_progress=self.total_progress)
        if self.error is not None:
            info.error = self.error
        return info

    # -- the verbs (called by the registry under its lock) ------------------------------

    def _pause(self) -> None:
        with self._cond:
            self.check_verb(JobVerb.PAUSE)
            if self._user_paused:
                raise QMPError("Job is already paused")
            self._user_paused = True

    def _resume(self) -> None:
        with self._cond:
            self.check_verb(JobVerb.RESUME)
            if not self._user_paused:
                raise QMPError("Can't resume a job that was not paused")
            self._user_paused = False
            self._cond.notify_all()

    def _cancel(self) -> None:
        with self._cond:
            self.check_verb(JobVerb.CANCEL)
            self._cancelled = True
            self._cond.notify_all()

    # -- the job's thread -----------------------------------------------------------------

    def _run(self, work: Callable[[Job], None]) -> None:
        try:
            if self._cancelled:
                raise JobCancelled()
            self._transition(St.RUNNING)
            work(self)
            if self._cancelled:  # cancelled after its last checkpoint: QEMU still reports it cancelled
                raise JobCancelled()
        except JobCancelled:
            self.error = CANCELLED_TEXT
        except (QMPError, MigError) as e:
            self.error = (e.desc if isinstance(e, QMPError) else str(e)) or type(e).__name__
        except Exception as e:  # noqa: BLE001 - a bug in the work ends the job with an error, never silently
            log.exception("job_crashed", job=self.id)
            self.error = f"internal error: {type(e).__name__}: {e}"
        if self.error is None:
            self.progress(self.total_progress, self.total_progress)
            self._transition(St.WAITING)
            self._transition(St.PENDING)
        else:
            log.warning("job_failed", job=self.id, type=self.type.value, error=self.error)
            self._transition(St.ABORTING)
        self._transition(St.CONCLUDED)  # auto-finalize


class JobRegistry:
    """Every job of a machine, by id: creation (QEMU's id rules) and the job-* verbs."""

    def __init__(self, emit: Callable[[str, Any], None]) -> None:
        self._emit = emit
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def create(self, job_id: str, job_type: JobType, work: Callable[[Job], None]) -> Job:
        """Create the job and start its work; QEMU's errors for a bad or used id."""
        if not _ID.fullmatch(job_id):
            raise QMPError(f"Invalid job ID '{job_id}'")
        with self._lock:
            if job_id in self._jobs:
                raise QMPError(f"Job ID '{job_id}' already in use")
            job = Job(job_id, job_type, self._emit)
            self._jobs[job_id] = job
        job._transition(St.CREATED)
        job.thread = threading.Thread(target=job._run, args=(work,), name=f"mig/job/{job_id}", daemon=True)
        job.thread.start()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise QMPError("Job not found")
        return job

    def query(self) -> list[JobInfo]:
        with self._lock:
            jobs = list(self._jobs.values())
        return [j.info() for j in jobs]

    def busy(self) -> list[Job]:
        """Jobs that have not concluded yet."""
        with self._lock:
            return [j for j in self._jobs.values() if j.status not in (St.CONCLUDED, St.NULL)]

    def pause(self, job_id: str) -> None:
        self.get(job_id)._pause()

    def resume(self, job_id: str) -> None:
        self.get(job_id)._resume()

    def cancel(self, job_id: str) -> None:
        self.get(job_id)._cancel()

    def complete(self, job_id: str) -> None:
        job = self.get(job_id)
        job.check_verb(JobVerb.COMPLETE)
        raise QMPError(f"The active block job '{job_id}' cannot be completed")  # no job type completes by hand

    def finalize(self, job_id: str) -> None:
        self.get(job_id).check_verb(JobVerb.FINALIZE)  # jobs finalize on their own: pending never lasts

    def dismiss(self, job_id: str) -> None:
        job = self.get(job_id)
        with job._cond:
            job.check_verb(JobVerb.DISMISS)
            job._transition(St.NULL)
        with self._lock:
            self._jobs.pop(job_id, None)
