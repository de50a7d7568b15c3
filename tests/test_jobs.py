"""The job layer over real QMP (an in-process server, a real socket): QEMU's statuses, events, verbs
allowed per status with QEMU's texts, pause at a checkpoint, cancel, failure, ids. The jobs here run a
work function of the test's own that waits where the test says (snapshot jobs: test_snapshots.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from mig_core.control.jobs import Job
from mig_core.control.manager import MigrationManager
from mig_core.errors import QMPError
from mig_core.schema.jobs import JobType
from mig_core.testing import InProcessServer, RawQMP, wait_until


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[MigrationManager, RawQMP]]:
    manager = MigrationManager()
    server = InProcessServer(manager, tmp_path / "jobs.sock")
    client = RawQMP(server.path)
    client.negotiate()
    try:
        yield manager, client
    finally:
        client.close()
        server.close()


class Gated:
    """A job's work in three steps; each waits for the test to open its gate, then passes a checkpoint."""

    def __init__(self, fail: str | None = None) -> None:
        self.gates = [threading.Event() for _ in range(3)]
        self.fail = fail
        self.steps_done = 0

    def __call__(self, job: Job) -> None:
        for i, gate in enumerate(self.gates):
            job.progress(i, 3)
            assert gate.wait(30)
            job.checkpoint()
            self.steps_done += 1
            if self.fail is not None:
                raise QMPError(self.fail)


def statuses(client: RawQMP, job_id: str) -> list[str]:
    """The job's JOB_STATUS_CHANGE events so far (a command first: events sent before its reply arrive)."""
    client.cmd({"execute": "query-status"})
    return [e["data"]["status"] for e in client.events if e["event"] == "JOB_STATUS_CHANGE"
            and e["data"]["id"] == job_id]


def error(client: RawQMP, command: str, **arguments: object) -> str:
    reply = client.cmd({"execute": command, "arguments": arguments})
    assert "error" in reply, reply
    assert reply["error"]["class"] == "GenericError"
    return reply["error"]["desc"]


def job_info(client: RawQMP, job_id: str) -> dict | None:
    return next((j for j in client.cmd({"execute": "query-jobs"})["return"] if j["id"] == job_id), None)


def wait_status(client: RawQMP, job_id: str, status: str) -> dict:
    return wait_until(lambda: (j := job_info(client, job_id)) is not None and j["status"] == status and j)


def start(manager: MigrationManager, job_id: str, work: Callable[[Job], None]) -> Job:
    return manager.jobs.create(job_id, JobType.SNAPSHOT_SAVE, work)


def test_pause_resume_and_the_verbs_each_status_refuses(served):
    manager, c = served
    work = Gated()
    start(manager, "j1", work)
    wait_status(c, "j1", "running")
    verb = "Job 'j1' in state '{}' cannot accept command verb '{}'"
    assert error(c, "job-complete", id="j1") == verb.format("running", "complete")
    assert error(c, "job-finalize", id="j1") == verb.format("running", "finalize")
    assert error(c, "job-dismiss", id="j1") == verb.format("running", "dismiss")
    assert error(c, "job-resume", id="j1") == "Can't resume a job that was not paused"
    assert c.cmd({"execute": "job-pause", "arguments": {"id": "j1"}}) == {"return": {}}
    assert error(c, "job-pause", id="j1") == "Job is already paused"
    assert job_info(c, "j1")["status"] == "running"  # a pause takes effect at the job's next checkpoint
    work.gates[0].set()
    info = wait_status(c, "j1", "paused")
    assert info == {"id": "j1", "type": "snapshot-save", "status": "paused", "current-progress": 0,
                    "total-progress": 3}
    assert work.steps_done == 0  # held at the checkpoint
    assert error(c, "job-complete", id="j1") == verb.format("paused", "complete")
    assert c.cmd({"execute": "job-resume", "arguments": {"id": "j1"}}) == {"return": {}}
    work.gates[1].set()
    work.gates[2].set()
    info = wait_status(c, "j1", "concluded")
    assert info == {"id": "j1", "type": "snapshot-save", "status": "concluded", "current-progress": 3,
                    "total-progress": 3}
    for v in ("pause", "resume", "cancel", "complete", "finalize"):
        assert error(c, f"job-{v}", id="j1") == verb.format("concluded", v)
    assert error(c, "job-dismiss", id="nope") == "Job not found"
    assert c.cmd({"execute": "job-dismiss", "arguments": {"id": "j1"}}) == {"return": {}}
    wait_until(lambda: "null" in statuses(c, "j1"))
    assert statuses(c, "j1") == ["created", "running", "paused", "running", "waiting", "pending", "concluded",
                                 "null"]
    assert c.cmd({"execute": "query-jobs"}) == {"return": []}
    assert error(c, "job-dismiss", id="j1") == "Job not found"


def test_cancel_of_a_paused_job_and_a_failing_job(served):
    manager, c = served
    work = Gated()
    start(manager, "c1", work)
    c.cmd({"execute": "job-pause", "arguments": {"id": "c1"}})
    work.gates[0].set()
    wait_status(c, "c1", "paused")
    assert c.cmd({"execute": "job-cancel", "arguments": {"id": "c1"}}) == {"return": {}}
    info = wait_status(c, "c1", "concluded")
    assert info["error"] == "Operation canceled" and work.steps_done == 0
    wait_until(lambda: "concluded" in statuses(c, "c1"))
    assert statuses(c, "c1") == ["created", "running", "paused", "running", "aborting", "concluded"]
    failing = Gated(fail="the work went wrong")
    start(manager, "f1", failing)
    failing.gates[0].set()
    info = wait_status(c, "f1", "concluded")
    assert info["error"] == "the work went wrong"
    wait_until(lambda: "concluded" in statuses(c, "f1"))
    assert statuses(c, "f1") == ["created", "running", "aborting", "concluded"]


def test_job_ids(served):
    manager, c = served
    for bad in ("1abc", "", "a b", "-x", "é"):
        reply = c.cmd({"execute": "snapshot-delete", "arguments": {"job-id": bad, "tag": "t", "devices": ["n"]}})
        assert reply["error"]["desc"] == f"Invalid job ID '{bad}'", reply
    work = Gated()
    start(manager, "dup", work)
    reply = c.cmd({"execute": "snapshot-delete", "arguments": {"job-id": "dup", "tag": "t", "devices": ["n"]}})
    assert reply["error"]["desc"] == "Job ID 'dup' already in use"
    for g in work.gates:
        g.set()
    wait_status(c, "dup", "concluded")
    c.cmd({"execute": "job-dismiss", "arguments": {"id": "dup"}})
    reply = c.cmd({"execute": "snapshot-delete", "arguments": {"job-id": "dup", "tag": "t", "devices": ["n"]}})
    assert reply == {"return": {}}  # a dismissed job's id may be used again
    info = wait_status(c, "dup", "concluded")
    assert info["error"] == "No block device node 'n'" and info["type"] == "snapshot-delete"
