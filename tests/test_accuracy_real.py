"""A small real few-shot task through the API, as a user runs it (slow: a few minutes
on 2 CPU cores): scanned digits 0-4 trained from scratch as the source model, then
the digits 5-9 with one training image each, transferred with AUTO and trained from
scratch on the same images. Transfer must beat scratch by a clear margin, and the
few-shot job must have trained on every given image and published its last epoch."""

from __future__ import annotations

import time

import pytest

import tlserve.client as tlclient
from bench import realdata
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tests.serverproc import serving

pytestmark = pytest.mark.slow

# Measured on this task at 32 px: bench/accuracy.py (digits, 1 per class, one thread
# per job) 12.8, 5.8 and 6.4 points on 3 seeds. (Textures at 3 per class gained 14 to 16
# until a tiny set from scratch got at least 4 steps an epoch; now 0 to 2.) 5 fails a
# transfer that does nothing.
MARGIN_POINTS = 5


def finished(tl: tlclient.Client, job: pb.Job, timeout: float = 900) -> pb.Job:
    deadline = time.monotonic() + timeout
    while job.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
        assert time.monotonic() < deadline, f"job {job.id} still {pb.JobState.Name(job.state)}"
        time.sleep(0.5)
        job = tl.get_job(job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job


def test_transfer_beats_scratch_on_real_one_shot_digits(tmp_path):
    digits = realdata.SETS["digits"]()
    data = tmp_path / "data"
    realdata.write_image_folder(data / "source", digits.source, realdata.sample_splits(digits.source, 150, 10, seed=0))
    realdata.write_image_folder(data / "target", digits.target, realdata.sample_splits(digits.target, 1, 100, seed=0))
    with serving(tmp_path / "home", "--data-root", str(data)) as server, tlclient.Client(server.address, timeout=300) as tl:
        tl.register_dataset("source", "source")
        target = tl.register_dataset("target", "target")
        counts = {s.split: s.image_count for s in target.splits}
        assert counts[pb.SPLIT_VAL] == 0 and counts[pb.SPLIT_TRAIN] == 5  # one image per class: none to draw

        common = dict(backbone="resnet18", image_size=32, seed=0)
        finished(tl, tl.fine_tune(dataset="source", model_name="source", weights="none", strategy="full",
                                  epochs=15, **common))
        transfer = finished(tl, tl.fine_tune(dataset="target", model_name="transfer", weights="model:source",
                                             strategy="auto", epochs=30, **common))
        scratch = finished(tl, tl.fine_tune(dataset="target", model_name="scratch", weights="none",
                                            strategy="full", epochs=30, **common))

        decision = transfer.decision
        assert decision.validation_protocol == pb.VALIDATION_PROTOCOL_FIXED_EPOCHS
        assert decision.validation_reason.startswith("fixed epochs: no validation images")
        assert decision.images_per_class == 1.0  # every given image trained
        gained = tl.get_model("transfer").test_metrics.top1_accuracy - tl.get_model("scratch").test_metrics.top1_accuracy
        assert 100 * gained >= MARGIN_POINTS, (decision.reason, gained)
        assert scratch.decision.validation_protocol == pb.VALIDATION_PROTOCOL_FIXED_EPOCHS
