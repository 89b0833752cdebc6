"""Job submission, lookup, cancellation and watching: the domain side of the
FineTune, GetJob, ListJobs, CancelJob and WatchJob RPCs.

`submit` checks everything that can be checked before any work starts — the
dataset, the backbone, the starting weights, the training options — so that a
mistake is an INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION now, not a
FAILED job later; then it queues the job and wakes the runner.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Mapping

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones, hardware
from tlserve.service.config import Settings
from tlserve.service.datasets import Datasets
from tlserve.service.errors import InvalidArgument
from tlserve.service.jobs.runner import JobRunner
from tlserve.service.jobs.weights import weights_choice
from tlserve.service.store.artifacts import ArtifactStore
from tlserve.service.store.jobs import TERMINAL_STATES, JobStore
from tlserve.service.store.models import ModelStore
from tlserve.service.training.config import TrainConfig

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# WatchJob polls the store: workers write progress from other processes.
WATCH_POLL_SECONDS = 0.25


def check_name(value: str, field: str) -> None:
    if not NAME.fullmatch(value):
        raise InvalidArgument(
            f"{field} must be 1 to 64 letters, digits, '.', '_' or '-' starting with a letter or digit, got {value!r}"
        )


# Labels as Kubernetes bounds them (a job's labels are copied onto its model): 64
# entries, keys of 63 characters, values of 256 here. Unbounded, eight jobs with
# 10 MB of labels each made every ListJobs answer too large to send.
MAX_LABELS = 64
LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
MAX_LABEL_VALUE_CHARS = 256
MAX_IDEMPOTENCY_KEY_CHARS = 128


def check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"labels: {len(labels)} entries, at most {MAX_LABELS}")
    for key, value in sorted(labels.items()):
        if not LABEL_KEY.fullmatch(key):
            raise InvalidArgument(
                f"labels: key {key[:80]!r}{'...' if len(key) > 80 else ''} must be 1 to 63 letters, digits, '.', '_', "
                "'/' or '-', starting and ending with a letter or digit"
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgument(f"labels: the value of {key!r} is {len(value)} characters, at most "
                                  f"{MAX_LABEL_VALUE_CHARS}")
        if not value.isprintable():
            raise InvalidArgument(f"labels: the value of {key!r} holds a control character")


def max_devices() -> int:
    """Processes a job may use: one per GPU, or one per CPU core without a GPU (gloo)."""
    return hardware.gpu_count() or os.cpu_count() or 1


class JobService:
    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        datasets: Datasets,
        models: ModelStore,
        artifacts: ArtifactStore,
        runner: JobRunner,
    ) -> None:
        self._settings = settings
        self._jobs = jobs
        self._datasets = datasets
        self._models = models
        self._artifacts = artifacts
        self._runner = runner

    def submit(self, request: pb.FineTuneRequest) -> pb.Job:
        """Validates and queues a fine-tune; blocking (runs in a worker thread)."""
        check_name(request.model_name, "model_name")
        check_labels(request.labels)
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise InvalidArgument(f"idempotency_key is {len(request.idempotency_key)} characters, at most "
                                  f"{MAX_IDEMPOTENCY_KEY_CHARS}")
        if not request.dataset:
            raise InvalidArgument("dataset is required: a dataset id or name (see ListDatasets)")
        if not request.backbone:
            raise InvalidArgument("backbone is required: a torchvision model name (see ListBackbones)")
        dataset = self._datasets.get(request.dataset)
        backbones.get_spec(request.backbone)
        weights_choice(
            request.weights, request.backbone, settings=self._settings, models=self._models,
            artifacts=self._artifacts, load=False,
        )
        if not 0 <= request.devices <= max_devices():
            raise InvalidArgument(f"devices must be between 0 and {max_devices()} on this server, got {request.devices}")
        train = next(s for s in dataset.splits if s.split == pb.SPLIT_TRAIN)
        TrainConfig.from_request(
            request,
            num_classes=len(dataset.class_names),
            train_images_per_class=train.image_count / len(dataset.class_names),
            device_type="cuda" if hardware.gpu_count() else "cpu",
        )
        stored = pb.FineTuneRequest()
        stored.CopyFrom(request)
        stored.dataset = dataset.id  # a name may be reused after a delete; the id may not
        job, _ = self._jobs.create(stored, dataset.id)
        self._runner.wake()
        return job

    def get(self, job_id: str) -> pb.Job:
        return self._jobs.get(job_id)

    def list(self, state: int, page_size: int, page_token: str) -> tuple[list[pb.Job], str]:
        if state not in pb.JobState.values():
            raise InvalidArgument(f"state {state} is not a JobState: one of "
                                  f"{', '.join(f'{n} ({v})' for n, v in pb.JobState.items())}")
        return self._jobs.list(state, page_size, page_token)

    async def cancel(self, job_id: str) -> pb.Job:
        await asyncio.to_thread(self._jobs.get, job_id)
        await self._runner.cancel(job_id)
        return await asyncio.to_thread(self._jobs.get, job_id)

    async def watch(self, job_id: str) -> AsyncIterator[pb.JobEvent]:
        """The latest event first (a late subscriber sees the state at once),
        then every new one; ends after the job's terminal event."""
        job = await asyncio.to_thread(self._jobs.get, job_id)
        yield job.progress
        last = job.progress.sequence
        while job.state not in TERMINAL_STATES:
            await asyncio.sleep(WATCH_POLL_SECONDS)
            for event in await asyncio.to_thread(self._jobs.events_after, job_id, last):
                yield event
                last = event.sequence
            job = await asyncio.to_thread(self._jobs.get, job_id)
        # Events written between the last poll and the terminal state.
        for event in await asyncio.to_thread(self._jobs.events_after, job_id, last):
            yield event
