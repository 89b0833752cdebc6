"""A small real few-shot task through the API, as a user runs it (slow: a few minutes
on 2 CPU cores): patches of five photographs trained from scratch as the source model,
then three textures (brick, grass, gravel) with 3 training images each, transferred
with AUTO and trained from scratch on the same images. Transfer must beat scratch by a
clear margin, and the few-shot job must have trained on every given image and
published its last epoch."""

from __future__ import annotations

import time

import pytest

import tlserve.client as tlclient
from bench import realdata
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tests.serverproc import serving

pytestmark = pytest.mark.slow

# Measured on this task at 32 px: bench/accuracy.py (textures, 3 per class, one thread
# per job) 14 to 16 points on each of 3 seeds; this test's seed with torch's default two
# threads, whose arithmetic differs, 8.3; the demo (seed 1) 14.7. 5 leaves room for
# seeds, threads and machines while still failing a transfer that does nothing.
MARGIN_POINTS = 5


def finished(tl: tlclient.Client, job: pb.Job, timeout: float = 900) -> pb.Job:
    deadline = time.monotonic() + timeout
    while job.state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
        assert time.monotonic() < deadline, f"job {job.id} still {pb.JobState.Name(job.state)}"
        time.sleep(0.5)
        job = tl.get_job(job.id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    return job


def test_transfer_beats_scratch_on_real_few_shot_textures(tmp_path):
    textures = realdata.SETS["textures"]()
    data = tmp_path / "data"
    realdata.write_image_folder(data / "source", textures.source, realdata.sample_splits(textures.source, 98, 10, seed=0))
    realdata.write_image_folder(data / "target", textures.target, realdata.sample_splits(textures.target, 3, 100, seed=0))
    with serving(tmp_path / "home", "--data-root", str(data)) as server, tlclient.Client(server.address, timeout=300) as tl:
        tl.register_dataset("source", "source")
        target = tl.register_dataset("target", "target")
        counts = {s.split: s.image_count for s in target.splits}
        assert counts[pb.SPLIT_VAL] == 3  # one per class drawn from train/ at registration...

        common = dict(backbone="resnet18", image_size=32, seed=0)
        finished(tl, tl.fine_tune(dataset="source", model_name="source", weights="none", strategy="full",
                                  epochs=15, **common))
        transfer = finished(tl, tl.fine_tune(dataset="target", model_name="transfer", weights="model:source",
                                             strategy="auto", epochs=30, **common))
        scratch = finished(tl, tl.fine_tune(dataset="target", model_name="scratch", weights="none",
                                            strategy="full", epochs=30, **common))

        decision = transfer.decision
        assert decision.validation_protocol == pb.VALIDATION_PROTOCOL_FIXED_EPOCHS
        assert "3 validation images tlserve set aside at upload train too" in decision.validation_reason
        assert decision.images_per_class == 3.0  # ...and given back: every given image trained
        gained = tl.get_model("transfer").test_metrics.top1_accuracy - tl.get_model("scratch").test_metrics.top1_accuracy
        assert 100 * gained >= MARGIN_POINTS, (decision.reason, gained)
        assert scratch.decision.validation_protocol == pb.VALIDATION_PROTOCOL_FIXED_EPOCHS
