"""A job's progress as the Reporter sees it: phase changes, a report about once a
second while stepping (images/s, ETA), and every epoch's end."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.errors import Cancelled
from tlserve.service.training.devices import Processes, broadcast

REPORT_INTERVAL_SECONDS = 1.0

if TYPE_CHECKING:
    from tlserve.service.training.engine import Reporter


# -- progress ------------------------------------------------------------------


class Progress:
    """Turns the loop's counters into JobEvents on rank 0, and polls cancellation."""

    def __init__(self, reporter: Reporter, procs: Processes, device: torch.device, total_epochs: int) -> None:
        self.reporter, self.procs, self.device = reporter, procs, device
        self.total_epochs = total_epochs
        self.total_steps = 0
        self.unfrozen: list[str] = []
        self._last_report = time.monotonic()
        self._images_since = 0
        self._epoch_seconds: list[float] = []
        self._epoch_started = time.monotonic()
        self._epoch_fraction = 0.0

    def check_cancelled(self, *, collective: bool = True) -> None:
        """Raises errors.Cancelled when the job is cancelled (within one step of
        `Reporter.cancelled()`). Under DDP (`collective`) rank
        0's answer is broadcast, so that every rank stops at the same step."""
        flag = self.reporter.cancelled() if self.procs.main or not collective else False
        if collective and self.procs.distributed:
            flag = broadcast([float(flag)], self.procs, self.device)[0] > 0
        if flag:
            raise Cancelled("the job was cancelled")

    def emit(self, **fields) -> None:
        if self.procs.main:
            event = pb.JobEvent(total_epochs=self.total_epochs, total_steps=self.total_steps, unfrozen_groups=self.unfrozen, **fields)
            eta = self._eta()
            if eta is not None:
                event.eta.FromTimedelta(datetime.timedelta(seconds=eta))
            self.reporter.report(event)

    def phase(self, phase: int, message: str, **fields) -> None:
        self.emit(phase=phase, message=message, **fields)

    def start_epoch(self) -> None:
        self._epoch_started = time.monotonic()
        self._epoch_fraction = 0.0

    def step(self, *, epoch: int, step: int, steps_in_epoch: int, step_in_epoch: int, images: int, stats: Callable[[], dict]) -> None:
        """Called after every optimiser step; reports at most every REPORT_INTERVAL_SECONDS."""
        self._images_since += images
        self._epoch_fraction = step_in_epoch / max(1, steps_in_epoch)
        now = time.monotonic()
        elapsed = now - self._last_report
        if elapsed >= REPORT_INTERVAL_SECONDS:
            # Under DDP `images` are this rank's; all ranks step together.
            rate = self._images_since * self.procs.world_size / elapsed
            self.emit(phase=pb.JOB_PHASE_TRAINING, epoch=epoch, step=step, images_per_second=rate, **stats())
            self._last_report, self._images_since = now, 0

    def end_epoch(self, **fields) -> None:
        self._epoch_seconds.append(time.monotonic() - self._epoch_started)
        self._epoch_fraction = 0.0
        self.emit(phase=pb.JOB_PHASE_TRAINING, **fields)

    def _eta(self) -> float | None:
        # Average epoch time of this attempt × epochs left (an upper bound when
        # early stopping ends the job sooner).
        if not self._epoch_seconds:
            return None
        done = len(self._epoch_seconds) + self._epoch_fraction + self.epochs_before
        mean = sum(self._epoch_seconds) / len(self._epoch_seconds)
        return max(0.0, (self.total_epochs - done) * mean)

    epochs_before = 0  # epochs finished by earlier attempts (resume)
