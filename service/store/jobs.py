"""Jobs and their progress events in the metadata store.

Shared by the server (which creates, lists, cancels and watches jobs) and the
job workers (separate processes, possibly on other nodes one day, which report
progress and results): everything a worker says goes through these rows, not
through a pipe to its parent. The full `tlserve.v1.Job` is stored as a
serialised message; `state`, `dataset_id`, `model_name`, `idempotency_key`,
`cancel_requested` and `worker_pid` are columns because they are queried.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.clock import now
from tlserve.service.errors import NotFound
from tlserve.service.store import paging
from tlserve.service.store.metadata import MetadataStore

TERMINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})


def new_job_id() -> str:
    return "job-" + secrets.token_hex(4)


class JobStore:
    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    def create(self, request: pb.FineTuneRequest, dataset_id: str) -> tuple[pb.Job, bool]:
        """Queues a job; returns (job, created). A request whose idempotency key was
        seen before returns the earlier job and created=False."""
        key = request.idempotency_key or None
        with self._store.transaction() as conn:
            if key is not None:
                row = conn.execute("SELECT proto FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
                if row is not None:
                    return pb.Job.FromString(row["proto"]), False
            job = pb.Job(id=new_job_id(), state=pb.JOB_STATE_QUEUED, request=request, create_time=now())
            job.progress.CopyFrom(pb.JobEvent(job_id=job.id, state=pb.JOB_STATE_QUEUED, time=job.create_time, message="queued"))
            t = time.time()
            conn.execute(
                "INSERT INTO jobs (id, state, create_time, update_time, idempotency_key, dataset_id, model_name, proto)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.state, t, t, key, dataset_id, request.model_name, job.SerializeToString()),
            )
        return job, True

    def get(self, job_id: str) -> pb.Job:
        rows = self._store.query("SELECT proto FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"job {job_id!r} does not exist (list jobs with ListJobs)")
        return pb.Job.FromString(rows[0]["proto"])

    def list(self, state: int, page_size: int, page_token: str) -> tuple[list[pb.Job], str]:
        if state:
            rows = self._store.query("SELECT proto FROM jobs WHERE state = ? ORDER BY create_time DESC, id", (state,))
        else:
            rows = self._store.query("SELECT proto FROM jobs ORDER BY create_time DESC, id")
        chunk, token = paging.page("jobs", rows, page_size, page_token, size_of=lambda r: len(r["proto"]))
        return [pb.Job.FromString(r["proto"]) for r in chunk], token

    def count_by_state(self) -> dict[int, int]:
        """JobState → number of jobs in it (states without jobs are absent)."""
        return {r["state"]: r["n"] for r in self._store.query("SELECT state, count(*) AS n FROM jobs GROUP BY state")}

    def ids_in_state(self, state: int) -> list[str]:
        """Oldest first: the order jobs are started in."""
        return [r["id"] for r in self._store.query("SELECT id FROM jobs WHERE state = ? ORDER BY create_time, id", (state,))]

    def update(self, job_id: str, mutate: Callable[[pb.Job], None], *, only_if_not_terminal: bool = True) -> pb.Job:
        """Read-modify-write of one job in a transaction. With `only_if_not_terminal`,
        a job that already ended is returned unchanged (a late worker report can't
        revive a cancelled job)."""
        with self._store.transaction() as conn:
            row = conn.execute("SELECT proto FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            job = pb.Job.FromString(row["proto"])
            if only_if_not_terminal and job.state in TERMINAL_STATES:
                return job
            mutate(job)
            conn.execute(
                "UPDATE jobs SET state = ?, update_time = ?, attempts = ?, proto = ? WHERE id = ?",
                (job.state, time.time(), job.attempts, job.SerializeToString(), job_id),
            )
        return job

    def transition(self, job_id: str, state: int, *, message: str = "", error: str = "") -> pb.Job:
        """Moves a job to `state` and records the change as a progress event."""

        def mutate(job: pb.Job) -> None:
            job.state = state
            if state == pb.JOB_STATE_RUNNING and not job.HasField("start_time"):
                job.start_time.CopyFrom(now())
            if state in TERMINAL_STATES:
                job.end_time.CopyFrom(now())
            if error:
                job.error = error

        job = self.update(job_id, mutate)
        if job.state == state:
            event = pb.JobEvent()
            event.CopyFrom(job.progress)
            event.state, event.message = state, message or error or pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()
            self.append_event(job_id, event)
        return self.get(job_id)

    def append_event(self, job_id: str, event: pb.JobEvent) -> pb.JobEvent:
        """Stores a progress event with the next sequence number and makes it the job's `progress`."""
        with self._store.transaction() as conn:
            row = conn.execute("SELECT proto FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            job = pb.Job.FromString(row["proto"])
            last = conn.execute("SELECT max(sequence) FROM job_events WHERE job_id = ?", (job_id,)).fetchone()[0]
            stored = pb.JobEvent()
            stored.CopyFrom(event)
            stored.job_id, stored.sequence = job_id, (last or 0) + 1
            if not stored.HasField("time"):
                stored.time.CopyFrom(now())
            if job.state in TERMINAL_STATES:
                stored.state = job.state  # a late report from a worker can't change the outcome
            elif not stored.state:
                stored.state = job.state
            job.progress.CopyFrom(stored)
            conn.execute(
                "INSERT INTO job_events (job_id, sequence, time, proto) VALUES (?, ?, ?, ?)",
                (job_id, stored.sequence, time.time(), stored.SerializeToString()),
            )
            conn.execute("UPDATE jobs SET proto = ?, update_time = ? WHERE id = ?", (job.SerializeToString(), time.time(), job_id))
        return stored

    def events_after(self, job_id: str, sequence: int) -> list[pb.JobEvent]:
        rows = self._store.query(
            "SELECT proto FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence", (job_id, sequence)
        )
        return [pb.JobEvent.FromString(r["proto"]) for r in rows]

    def request_cancel(self, job_id: str) -> None:
        with self._store.transaction() as conn:
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._store.query("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def set_worker_pid(self, job_id: str, pid: int | None) -> None:
        with self._store.transaction() as conn:
            conn.execute("UPDATE jobs SET worker_pid = ? WHERE id = ?", (pid, job_id))

    def uses_dataset(self, dataset_id: str) -> list[str]:
        """Ids of queued or running jobs that read this dataset."""
        rows = self._store.query(
            "SELECT id FROM jobs WHERE dataset_id = ? AND state IN (?, ?)",
            (dataset_id, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING),
        )
        return [r["id"] for r in rows]
