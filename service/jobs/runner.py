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

Faults don't stop the supervision: an error while starting jobs (the store
raising, the home briefly unwritable) is logged and retried after a pause that
grows; a worker that can't be started fails its job with the reason; a worker's
exit is recorded even if the store fails at first. The loop only ends in
`stop`; if it ends any other way, `healthy` turns False and the `on_dead`
callback given to `start` is awaited (the server then reports NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import metrics
from tlserve.service.config import Settings
from tlserve.service.store.jobs import TERMINAL_STATES, JobStore

log = logging.getLogger("tlserve.jobs")

# After a cancel request, the worker's next step sees the flag; these bound a
# worker stuck inside one step (for example decoding a huge batch).
CANCEL_TERM_AFTER_SECONDS = 10.0
CANCEL_KILL_AFTER_SECONDS = 5.0
POLL_SECONDS = 0.5
LOG_TAIL_LINES = 5
# After errors in a row the pause doubles from POLL_SECONDS up to this: a store that
# stays broken costs a log line every half minute, not a spinning core.
BACKOFF_MAX_SECONDS = 30.0


def backoff_seconds(failures: int) -> float:
    """The pause before the next try after `failures` errors in a row (0: a plain poll)."""
    return min(BACKOFF_MAX_SECONDS, POLL_SECONDS * 2 ** min(failures, 16))


def worker_command(settings: Settings, job: pb.Job) -> list[str]:
    worker = ["-m", "tlserve.service.jobs.worker", "--job-id", job.id, "--home", str(settings.home)]
    if settings.data_root is not None:
        worker += ["--data-root", str(settings.data_root)]
    if job.request.devices > 1:
        # torchrun: one process per device, rendezvous on a free local port.
        worker = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={job.request.devices}", *worker]
    return [sys.executable, "-m", "tlserve.service.jobs.launch", sys.executable, *worker]


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
        self._on_dead: Callable[[], Awaitable[None]] | None = None
        self._stopping = False

    def log_path(self, job_id: str):
        return self._settings.home / "jobs" / job_id / "worker.log"

    @property
    def healthy(self) -> bool:
        """Whether queued jobs are being started: started, and the loop still runs."""
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self, *, on_dead: Callable[[], Awaitable[None]] | None = None) -> None:
        """Resumes interrupted jobs and starts the loop; `on_dead` is awaited if the loop
        ever ends other than by `stop`."""
        await asyncio.to_thread(self._requeue_interrupted)
        self._on_dead = on_dead
        self._loop_task = asyncio.create_task(self._run(), name="job-runner")
        self._loop_task.add_done_callback(self._loop_ended)

    def _requeue_interrupted(self) -> None:
        for job_id in self._jobs.ids_in_state(pb.JOB_STATE_RUNNING):
            log.info("resuming interrupted job", extra={"fields": {"job_id": job_id}})
            self._jobs.transition(job_id, pb.JOB_STATE_QUEUED, message="server restarted: resuming from the last checkpoint")

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coroutine: Coroutine, name: str | None = None) -> None:
        """Runs a task that `stop` cancels if it is still running then."""
        task = asyncio.create_task(coroutine, name=name)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _run(self) -> None:
        """Starts queued jobs until `stop`. An error is logged and tried again after a
        growing pause: a loop that ended here would leave every later job QUEUED."""
        failures = 0
        while not self._stopping:
            try:
                await self._start_queued()
                failures = 0
            except Exception:
                failures += 1
                log.exception("cannot start queued jobs; trying again",
                              extra={"fields": {"failures": failures, "retry_seconds": backoff_seconds(failures)}})
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), backoff_seconds(failures))

    def _loop_ended(self, task: asyncio.Task) -> None:
        """Only `stop` may end the loop; any other end is logged and reported to `on_dead`."""
        if self._stopping:
            return
        error = None if task.cancelled() else task.exception()
        log.error("the job runner stopped: queued jobs will not start", exc_info=error,
                  extra={"fields": {"reason": repr(error) if error else "cancelled"}})
        if self._on_dead is not None:
            self._spawn(self._on_dead())

    async def _start_queued(self) -> None:
        queued = await asyncio.to_thread(self._jobs.ids_in_state, pb.JOB_STATE_QUEUED)
        for job_id in queued:
            if len(self._active) >= self._settings.job_workers:
                break
            if job_id not in self._active:
                await self._launch(job_id)

    async def _launch(self, job_id: str) -> None:
        job = await asyncio.to_thread(self._jobs.get, job_id)
        try:
            process = await self._start_worker(job)
        except Exception as e:
            # The cause (a full or unwritable home, no memory to fork) would fail a
            # retry the same way; the job fails with it, and later jobs get their turn.
            reason = f"could not start the training worker: {e}"
            log.warning("job failed", extra={"fields": {"job_id": job_id, "reason": reason}})
            job = await asyncio.to_thread(self._jobs.transition, job_id, pb.JOB_STATE_FAILED, error=reason)
            self._metrics.observe_job_end(job)
            return
        self._active[job_id] = process
        log.info("job started", extra={"fields": {"job_id": job_id, "pid": process.pid, "devices": job.request.devices}})
        try:
            await asyncio.to_thread(self._jobs.set_worker_pid, job_id, process.pid)
        finally:
            # Watched even if the store failed just now: a worker nobody waits for
            # would leave its job RUNNING when it exits.
            self._spawn(self._supervise(job_id, process), name=f"job-{job_id}")

    async def _start_worker(self, job: pb.Job) -> asyncio.subprocess.Process:
        path = self.log_path(job.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            return await asyncio.create_subprocess_exec(
                *worker_command(self._settings, job),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                # Its own process group: a Ctrl-C at the server's terminal is the
                # server's to handle, and cancellation can signal torchrun's children too.
                start_new_session=True,
            )

    async def _supervise(self, job_id: str, process: asyncio.subprocess.Process) -> None:
        returncode = await process.wait()
        self._active.pop(job_id, None)
        await self._record_exit(job_id, returncode)
        self.wake()

    async def _record_exit(self, job_id: str, returncode: int) -> None:
        """Settles the job, trying again after a growing pause while the store fails
        (a full disk): given up, the job would stay RUNNING with no worker."""
        failures = 0
        while not self._stopping:
            try:
                await asyncio.to_thread(self._settle, job_id, returncode)
                return
            except Exception:
                failures += 1
                pause = backoff_seconds(failures)
                log.exception("cannot record a worker's exit; trying again",
                              extra={"fields": {"job_id": job_id, "failures": failures, "retry_seconds": pause}})
                await asyncio.sleep(pause)

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
            # Queued, or RUNNING with no worker here (it exited and its end is not
            # recorded yet): nothing would act on the flag, so the job ends now.
            job = await asyncio.to_thread(self._jobs.get, job_id)
            if job.state not in TERMINAL_STATES:
                await asyncio.to_thread(self._jobs.transition, job_id, pb.JOB_STATE_CANCELLED, message="cancelled")
            return
        self._spawn(self._escalate(job_id, process))

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
            await asyncio.wait({self._loop_task})  # a loop that died was logged by `_loop_ended`
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
