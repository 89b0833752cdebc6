"""Runs queued fine-tuning jobs, each in a worker process of its own.

A worker crash, an out-of-memory kill or a hung CUDA context takes down only
that process: the runner sees the exit and marks the job FAILED with the
reason (exit code or signal, and the end of the worker's log). Up to
`settings.job_workers` jobs run at once, oldest first.

Workers report through the metadata store, so the runner only launches,
watches exits and enforces cancellation:

- CancelJob on a queued job cancels it at once; on a running job it sets the
  job's cancel flag, which the worker polls every step, and escalates to
  SIGTERM and then SIGKILL if the worker does not stop in time.
- On server start, jobs left RUNNING by a previous server (which died, or
  was stopped while they ran) are queued again and resume from their last
  checkpoint. Workers die with the server (`service.jobs.launch`), so
  nothing runs unsupervised.
- `devices > 1` launches the worker under torchrun (DDP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from client.tlserve.v1 import tlserve_pb2 as pb
from service import metrics
from service.config import Settings
from service.store.jobs import TERMINAL_STATES, JobStore

log = logging.getLogger("tlserve.jobs")

# After a cancel request, the worker's next step sees the flag; these bound a
# worker stuck inside one step (for example decoding a huge batch).
CANCEL_TERM_AFTER_SECONDS = 10.0
CANCEL_KILL_AFTER_SECONDS = 5.0
POLL_SECONDS = 0.5
LOG_TAIL_LINES = 5

def worker_command(settings: Settings, job: pb.Job) -> list[str]:
    worker = ["-m", "service.jobs.worker", "--job-id", job.id, "--home", str(settings.home)]
    if settings.data_root is not None:
        worker += ["--data-root", str(settings.data_root)]
    if job.request.devices > 1:
        # torchrun: one process per device, rendezvous on a free local port.
        worker = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.request.devices}", *worker]
    return [sys.executable, "-m", "service.jobs.launch", sys.executable, *worker]


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        sig = signal.Signals(-returncode)
        hint = " (out of memory?)" if sig == signal.SIGKILL else ""
        return f"the training worker was killed by {sig.name}{hint}"
    return f"the training worker exited with code {returncode}"


class JobRunner:
    def __init__(
        self, settings: Settings, jobs: JobStore, *, training_metrics: metrics.TrainingMetrics = metrics.TRAINING,
    ) -> None:
        self._settings = settings
        self._jobs = jobs
        self._metrics = training_metrics
        self._active: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False

    def log_path(self, job_id: str):
        return self._settings.home / "jobs" / job_id / "worker.log"

    async def start(self) -> None:
        await asyncio.to_thread(self._requeue_interrupted)
        self._loop_task = asyncio.create_task(self._run(), name="job-runner")

    def _requeue_interrupted(self) -> None:
        for job_id in self._jobs.ids_in_state(pb.JOB_STATE_RUNNING):
            log.info("resuming interrupted job", extra={"fields": {"job_id": job_id}})
            self._jobs.transition(job_id, pb.JOB_STATE_QUEUED, message="server restarted: resuming from the last checkpoint")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._stopping:
            queued = await asyncio.to_thread(self._jobs.ids_in_state, pb.JOB_STATE_QUEUED)
            for job_id in queued:
                if len(self._active) >= self._settings.job_workers:
                    break
                if job_id not in self._active:
                    await self._launch(job_id)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    async def _launch(self, job_id: str) -> None:
        job = await asyncio.to_thread(self._jobs.get, job_id)
        path = self.log_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            process = await asyncio.create_subprocess_exec(
                *worker_command(self._settings, job),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group: a Ctrl-C at the server's terminal is the
                # server's to handle, and cancellation can signal torchrun's children too.
                start_new_session=True,
            )
        self._active[job_id] = process
        await asyncio.to_thread(self._jobs.set_worker_pid, job_id, process.pid)
        log.info("job started", extra={"fields": {"job_id": job_id, "pid": process.pid, "devices": job.request.devices}})
        task = asyncio.create_task(self._supervise(job_id, process), name=f"job-{job_id}")
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _supervise(self, job_id: str, process: asyncio.subprocess.Process) -> None:
        returncode = await process.wait()
        self._active.pop(job_id, None)
        if not self._stopping:
            await asyncio.to_thread(self._settle, job_id, returncode)
        self.wake()

    def _settle(self, job_id: str, returncode: int) -> None:
        """After a worker exits: a job it left unfinished is CANCELLED or FAILED. Either
        way the job ended here, once: its duration is recorded."""
        self._jobs.set_worker_pid(job_id, None)
        job = self._jobs.get(job_id)
        if job.state in TERMINAL_STATES:
            log.info("job ended", extra={"fields": {"job_id": job_id, "state": pb.JobState.Name(job.state)}})
        elif self._jobs.cancel_requested(job_id):
            job = self._jobs.transition(job_id, pb.JOB_STATE_CANCELLED, message="cancelled")
        else:
            reason = exit_reason(returncode)
            tail = self._log_tail(job_id)
            log.warning("job failed", extra={"fields": {"job_id": job_id, "reason": reason}})
            job = self._jobs.transition(
                job_id, pb.JOB_STATE_FAILED, error=reason + (f"; last log lines: {tail}" if tail else "")
            )
        self._metrics.observe_job_end(job)

    def _log_tail(self, job_id: str) -> str:
        try:
            lines = self.log_path(job_id).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-LOG_TAIL_LINES:])

    async def cancel(self, job_id: str) -> None:
        await asyncio.to_thread(self._jobs.request_cancel, job_id)
        process = self._active.get(job_id)
        if process is None:
            job = await asyncio.to_thread(self._jobs.get, job_id)
            if job.state == pb.JOB_STATE_QUEUED:
                await asyncio.to_thread(self._jobs.transition, job_id, pb.JOB_STATE_CANCELLED, message="cancelled")
            return
        task = asyncio.create_task(self._escalate(job_id, process))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _escalate(self, job_id: str, process: asyncio.subprocess.Process) -> None:
        for sig, wait in ((signal.SIGTERM, CANCEL_TERM_AFTER_SECONDS), (signal.SIGKILL, CANCEL_KILL_AFTER_SECONDS)):
            try:
                await asyncio.wait_for(asyncio.shield(process.wait()), wait)
                return
            except asyncio.TimeoutError:
                log.warning("worker ignores cancellation", extra={"fields": {"job_id": job_id, "signal": sig.name}})
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, sig)

    async def stop(self, timeout: float = 10.0) -> None:
        """Stops the workers; their jobs stay RUNNING and resume at the next start."""
        self._stopping = True
        self.wake()
        if self._loop_task is not None:
            await self._loop_task
        for job_id, process in list(self._active.items()):
            # A worker may be finishing a job that already ended; only unfinished jobs resume.
            log.info("stopping worker", extra={"fields": {"job_id": job_id}})
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        if self._active:
            done = asyncio.gather(*(p.wait() for p in self._active.values()))
            try:
                await asyncio.wait_for(done, timeout)
            except asyncio.TimeoutError:
                for process in self._active.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
        for task in list(self._watchers):
            task.cancel()
