"""Faults around the job runner: the store raising, a home it can't write, a worker
that can't start or dies unrecorded, a checkpoint write on a full disk, and the
supervising task itself ending. Unit tests drive a real JobRunner on a real store
with a stand-in worker (a short Python process); the last test runs a real server
in-process on port 0 and reads its health over a channel."""

from __future__ import annotations

import asyncio
import errno
import logging
import pathlib
import sqlite3
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.config import Settings
from tlserve.service.jobs import runner as runner_module
from tlserve.service.jobs.runner import JobRunner
from tlserve.service.jobs.control import JobService
from tlserve.service.store import MetadataStore
from tlserve.service.store.jobs import JobStore
from tlserve.service.training import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Does what the real worker does first (marks its job RUNNING), then exits with a code.
STAND_IN_WORKER = """
import sys
sys.path.insert(0, {root!r})
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.store import MetadataStore
from tlserve.service.store.jobs import JobStore
JobStore(MetadataStore({database!r})).transition({job_id!r}, pb.JOB_STATE_RUNNING)
sys.exit({code})
"""
WORKER_EXIT_CODE = 3


class Fatal(BaseException):
    """What the runner's loop does not catch (it catches Exception): stands for any
    end of the supervising task other than `stop`."""


@pytest.fixture(autouse=True)
def quick_polls(monkeypatch):
    """Polls and retry pauses of tens of milliseconds, so that each test takes about a second."""
    monkeypatch.setattr(runner_module, "POLL_SECONDS", 0.05)


@pytest.fixture
def settings(tmp_path, monkeypatch):
    settings = Settings.load(["--home", str(tmp_path / "home")], environ={})

    def stand_in(settings: Settings, job: pb.Job) -> list[str]:
        code = STAND_IN_WORKER.format(root=str(ROOT), database=str(settings.database_path), job_id=job.id,
                                      code=WORKER_EXIT_CODE)
        return [sys.executable, "-c", code]

    monkeypatch.setattr(runner_module, "worker_command", stand_in)
    return settings


@pytest.fixture
def jobs(settings):
    metadata = MetadataStore(settings.database_path)
    yield JobStore(metadata)
    metadata.close()


def queue_job(jobs: JobStore) -> str:
    job, _ = jobs.create(pb.FineTuneRequest(dataset="ds-1", model_name="m", backbone="resnet18"), "ds-1")
    return job.id


async def ended(jobs: JobStore, job_id: str, timeout: float = 10.0) -> pb.Job:
    """The job once it has ended; fails the test if it is still unfinished after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (job := jobs.get(job_id)).state not in (pb.JOB_STATE_FAILED, pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_CANCELLED):
        assert time.monotonic() < deadline, f"job still {pb.JobState.Name(job.state)} after {timeout} s"
        await asyncio.sleep(0.05)
    return job


def ran_the_worker(job: pb.Job) -> bool:
    return job.state == pb.JOB_STATE_FAILED and f"exited with code {WORKER_EXIT_CODE}" in job.error


def fail_once(monkeypatch, obj, name: str, error: BaseException, when=lambda *args: True) -> list[tuple]:
    """Makes `obj.name` raise `error` on its first call for which `when(*args)` holds; returns the calls."""
    real = getattr(obj, name)
    calls: list[tuple] = []

    def wrapper(*args):
        calls.append(args)
        if when(*args) and not any(when(*c) for c in calls[:-1]):
            raise error
        return real(*args)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


def test_a_store_error_in_the_loop_is_logged_and_queued_jobs_still_start(settings, jobs, monkeypatch, caplog):
    fail_once(monkeypatch, jobs, "ids_in_state", sqlite3.OperationalError("disk I/O error"),
              when=lambda state: state == pb.JOB_STATE_QUEUED)
    job_id = queue_job(jobs)

    async def main() -> pb.Job:
        runner = JobRunner(settings, jobs)
        await runner.start()
        try:
            job = await ended(jobs, job_id)
            assert runner.healthy
            return job
        finally:
            await runner.stop()

    assert ran_the_worker(asyncio.run(main()))
    logged = [r for r in caplog.records if r.name == "tlserve.jobs" and r.exc_info]
    assert logged and "disk I/O error" in str(logged[0].exc_info[1])


def test_an_error_that_persists_is_retried_after_growing_pauses_not_in_a_spin(settings, jobs, monkeypatch):
    calls: list[float] = []

    def broken(state: int) -> list[str]:
        if state == pb.JOB_STATE_QUEUED:
            calls.append(time.monotonic())
            raise sqlite3.OperationalError("database is locked")
        return []

    monkeypatch.setattr(jobs, "ids_in_state", broken)

    async def main() -> bool:
        runner = JobRunner(settings, jobs)
        await runner.start()
        await asyncio.sleep(1.0)
        healthy = runner.healthy
        await runner.stop()
        return healthy

    assert asyncio.run(main())
    # Pauses of 0.1, 0.2, 0.4, 0.8 s: four tries in the second at most (a busy machine only lengthens them).
    assert 2 <= len(calls) <= 4, len(calls)
    pauses = [b - a for a, b in zip(calls, calls[1:])]
    assert all(pause >= 0.9 * runner_module.backoff_seconds(n) for n, pause in enumerate(pauses, 1)), pauses


def test_a_worker_that_cannot_start_fails_its_job_with_the_reason_and_later_jobs_run(settings, jobs):
    # The runner writes each worker's log under HOME/jobs: a file there makes that
    # impossible, as an unwritable or full home would (root ignores permission bits).
    (settings.home / "jobs").write_text("not a directory")
    first = queue_job(jobs)

    async def main() -> tuple[pb.Job, pb.Job]:
        runner = JobRunner(settings, jobs)
        await runner.start()
        try:
            failed = await ended(jobs, first)
            (settings.home / "jobs").unlink()
            second = queue_job(jobs)
            runner.wake()
            return failed, await ended(jobs, second)
        finally:
            await runner.stop()

    failed, later = asyncio.run(main())
    assert failed.state == pb.JOB_STATE_FAILED
    assert "could not start the training worker" in failed.error and "Not a directory" in failed.error
    assert ran_the_worker(later)


@pytest.mark.parametrize("moment", ["when the worker starts", "when the worker exits"])
def test_a_store_error_around_a_worker_never_leaves_its_job_running_without_one(settings, jobs, monkeypatch, moment):
    started = moment == "when the worker starts"
    fail_once(monkeypatch, jobs, "set_worker_pid", sqlite3.OperationalError("database or disk is full"),
              when=lambda job_id, pid: (pid is not None) == started)
    job_id = queue_job(jobs)

    async def main() -> pb.Job:
        runner = JobRunner(settings, jobs)
        await runner.start()
        try:
            return await ended(jobs, job_id)
        finally:
            await runner.stop()

    assert ran_the_worker(asyncio.run(main()))


def test_cancel_of_a_running_job_whose_worker_is_gone_cancels_it(settings, jobs):
    # A worker marked its job RUNNING, then died without the runner recording it.
    job_id = queue_job(jobs)
    jobs.transition(job_id, pb.JOB_STATE_RUNNING)
    service = JobService(settings, jobs, datasets=None, models=None, artifacts=None, runner=JobRunner(settings, jobs))

    job = asyncio.run(service.cancel(job_id))
    assert pb.JobState.Name(job.state) == "JOB_STATE_CANCELLED"
    again = asyncio.run(service.cancel(job_id))
    assert pb.JobState.Name(again.state) == "JOB_STATE_CANCELLED"
    assert [e.state for e in jobs.events_after(job_id, 0)].count(pb.JOB_STATE_CANCELLED) == 1


@pytest.mark.parametrize("failing", ["torch.save", "os.fsync"])
def test_a_checkpoint_write_on_a_full_disk_leaves_no_temp_file_and_the_last_checkpoint_intact(
    tmp_path, monkeypatch, failing
):
    path = checkpoint.path_in(tmp_path / "checkpoints")
    checkpoint.save({"epoch": 1, "weights": torch.ones(3)}, path)
    full = OSError(errno.ENOSPC, "No space left on device")

    def save_part(state, f) -> None:
        f.write(b"\0" * (1 << 20))  # a megabyte of the checkpoint made it to disk
        raise full

    def no_space(fd: int) -> None:
        raise full

    module, name = failing.split(".")
    monkeypatch.setattr(getattr(checkpoint, module), name, save_part if name == "save" else no_space)
    with pytest.raises(OSError) as raised:
        checkpoint.save({"epoch": 2, "weights": torch.zeros(3)}, path)
    assert raised.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == [checkpoint.FILE_NAME]
    assert checkpoint.load(path)["epoch"] == 1


def test_a_runner_whose_supervising_task_ends_is_unhealthy_and_calls_on_dead(settings, jobs, monkeypatch, caplog):
    async def main() -> tuple[bool, bool]:
        dead = asyncio.Event()

        async def on_dead() -> None:
            dead.set()

        runner = JobRunner(settings, jobs)
        await runner.start(on_dead=on_dead)
        assert runner.healthy
        fail_once(monkeypatch, jobs, "ids_in_state", Fatal("the loop cannot go on"))
        await asyncio.wait_for(dead.wait(), 5)
        healthy = runner.healthy
        await runner.stop()  # a dead loop doesn't make stop raise
        return healthy

    assert not asyncio.run(main())
    assert any(r.name == "tlserve.jobs" and r.levelno == logging.ERROR for r in caplog.records)


def test_a_runner_stopped_on_purpose_does_not_call_on_dead(settings, jobs):
    calls: list[None] = []

    async def on_dead() -> None:
        calls.append(None)

    async def main() -> bool:
        runner = JobRunner(settings, jobs)
        await runner.start(on_dead=on_dead)
        await runner.stop()
        await asyncio.sleep(0.1)
        return runner.healthy

    assert not asyncio.run(main())
    assert calls == []


def test_server_health_turns_not_serving_when_its_job_runner_dies(tmp_path, monkeypatch):
    from tlserve.service.server import TLSERVE_SERVICE, create_server

    settings = Settings.load(
        ["--home", str(tmp_path / "home"), "--grpc-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0"],
        environ={},
    )

    async def statuses(stub: health_pb2_grpc.HealthStub) -> list[int]:
        return [(await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
                for name in ("", TLSERVE_SERVICE)]

    async def main() -> tuple[list[int], list[int]]:
        server = await create_server(settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.grpc_address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                before = await statuses(stub)
                fail_once(monkeypatch, JobStore, "ids_in_state", Fatal("the loop cannot go on"))
                deadline = time.monotonic() + 5
                while (after := await statuses(stub)) != [health_pb2.HealthCheckResponse.NOT_SERVING] * 2:
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                return before, after
        finally:
            await server.stop(0)

    before, after = asyncio.run(main())
    assert before == [health_pb2.HealthCheckResponse.SERVING] * 2
    assert after == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
