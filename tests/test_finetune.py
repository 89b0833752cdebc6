"""Fine-tuning through the client against a live server, as a backend service uses it:
upload → fine-tune → watch → model; every strategy; cancel; crashes; kill -9 and resume;
bad requests answered with the right status and nothing left behind.

Tiny on purpose: 32 px procedural shapes, mobilenet_v3_small from scratch, a few epochs.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import zipfile

import grpc
import pytest
import torch
import torchvision

import tlserve.client as tlclient
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.training.synthetic import TARGET_SHAPES, write_image_folder
from tests.serverproc import ServerProcess, alive, serving

BACKBONE = "mobilenet_v3_small"
TERMINAL = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def tiny_request(dataset: str, model_name: str, *, epochs: int = 2, **fields) -> pb.FineTuneRequest:
    """A job that takes seconds: `fields` are top-level FineTuneRequest fields."""
    request = pb.FineTuneRequest(
        dataset=dataset, model_name=model_name, backbone=BACKBONE,
        weights=pb.WeightsSource(scratch=pb.WeightsSource.Scratch()),
        strategy=pb.STRATEGY_FULL, image_size=32, seed=7,
        training=pb.TrainingOptions(epochs=epochs, batch_size=8),
    )
    for key, value in fields.items():
        setattr(request, key, value)
    return request


def wait_for(tl: tlclient.Client, job_id: str, timeout: float = 240) -> pb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = tl.get_job(job_id)
        if job.state in TERMINAL:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {pb.JobState.Name(job.state)} after {timeout} s: {job}")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root / "shapes", TARGET_SHAPES[:3], 8, size=32, seed=3)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_root):
    with serving(
        tmp_path_factory.mktemp("ft") / "home", "--data-root", str(data_root), "--job-workers", "2"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def dataset(tl, data_root) -> pb.Dataset:
    return tl.upload_dataset(data_root / "shapes", "shapes")


def test_upload_finetune_watch_and_get_the_model(tl, dataset):
    assert list(dataset.class_names) == sorted(TARGET_SHAPES[:3])
    job = tl.fine_tune(tiny_request(dataset.name, "flow"))
    assert job.state == pb.JOB_STATE_QUEUED and job.request.dataset == dataset.id
    events = list(tl.watch_job(job.id))
    states = [e.state for e in events]
    assert states[-1] == pb.JOB_STATE_SUCCEEDED
    assert pb.JOB_STATE_RUNNING in states
    sequences = [e.sequence for e in events]
    assert sequences == sorted(sequences)
    epochs = [e for e in events if e.phase == pb.JOB_PHASE_TRAINING and e.total_epochs]
    assert epochs and max(e.epoch for e in epochs) == 2
    job = tl.get_job(job.id)
    assert job.model.name == "flow" and job.model.version == 1 and job.attempts == 1
    model = tl.get_model("flow")
    assert list(model.class_names) == list(dataset.class_names)
    assert model.backbone == BACKBONE and model.job_id == job.id
    assert model.lineage.dataset_id == dataset.id and model.lineage.strategy == pb.STRATEGY_FULL
    assert model.lineage.hyperparameters.training.epochs == 2
    assert model.test_metrics.image_count > 0 and 0 <= model.test_metrics.top1_accuracy <= 1
    assert len(model.test_metrics.confusion_matrix) == 9
    assert model.preprocessing.crop_size == 32 and len(model.preprocessing.mean) == 3
    assert model.parameter_count > 0 and model.gflops > 0
    (artifact,) = model.artifacts
    assert artifact.format == pb.ARTIFACT_FORMAT_PYTORCH and artifact.size_bytes > 0 and len(artifact.sha256) == 64


def test_a_late_watcher_gets_the_final_state_at_once(tl, dataset):
    job = tl.fine_tune(tiny_request(dataset.id, "late", epochs=1))
    wait_for(tl, job.id)
    events = list(tl.watch_job(job.id))
    assert len(events) == 1 and events[0].state == pb.JOB_STATE_SUCCEEDED


@pytest.mark.parametrize(
    "strategy",
    [pb.STRATEGY_FEATURE_EXTRACTION, pb.STRATEGY_PARTIAL, pb.STRATEGY_PROGRESSIVE_UNFREEZING,
     pb.STRATEGY_PROTOTYPE, pb.STRATEGY_AUTO],
    ids=lambda s: pb.Strategy.Name(s),
)
def test_every_strategy_publishes_a_model(tl, dataset, strategy):
    name = pb.Strategy.Name(strategy).lower().replace("_", "-")
    job = wait_for(tl, tl.fine_tune(tiny_request(dataset.id, name, strategy=strategy)).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    model = tl.get_model(name)
    assert model.lineage.strategy not in (pb.STRATEGY_UNSPECIFIED, pb.STRATEGY_AUTO)
    assert model.decision.strategy == model.lineage.strategy and model.decision.reason


def test_chained_transfer_starts_from_an_earlier_model(tl, dataset):
    wait_for(tl, tl.fine_tune(tiny_request(dataset.id, "parent", epochs=1)).id)
    child = tiny_request(dataset.id, "child", epochs=1)
    child.weights.model.CopyFrom(pb.ModelRef(name="parent"))
    job = wait_for(tl, tl.fine_tune(child).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert tl.get_model("child").lineage.parent == pb.ModelRef(name="parent", version=1)


def test_weights_from_a_state_dict_file_under_the_data_root(tl, dataset, data_root):
    torch.save(torchvision.models.get_model(BACKBONE).state_dict(), data_root / "imagenet-like.pt")
    request = tiny_request(dataset.id, "from-file", epochs=1)
    request.weights.file = "imagenet-like.pt"
    job = wait_for(tl, tl.fine_tune(request).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error


def test_same_idempotency_key_starts_one_job(tl, dataset):
    request = tiny_request(dataset.id, "idem", epochs=1, idempotency_key="retry-1")
    first, second = tl.fine_tune(request), tl.fine_tune(request)
    assert first.id == second.id
    wait_for(tl, first.id)


def test_cancel_stops_a_running_job_within_seconds(tl, dataset):
    job = tl.fine_tune(tiny_request(dataset.id, "cancelled", epochs=200))
    for event in tl.watch_job(job.id):
        if event.phase == pb.JOB_PHASE_TRAINING:
            break
    started = time.monotonic()
    tl.cancel_job(job.id)
    job = wait_for(tl, job.id, timeout=30)
    assert job.state == pb.JOB_STATE_CANCELLED
    assert time.monotonic() - started < 15
    with pytest.raises(tlclient.TLServeError) as e:
        tl.get_model("cancelled")
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_cancel_a_queued_job_is_immediate(tl, dataset):
    # Two long jobs fill both worker slots; the third waits in the queue.
    busy = [tl.fine_tune(tiny_request(dataset.id, f"busy{i}", epochs=200)) for i in range(2)]
    queued = tl.fine_tune(tiny_request(dataset.id, "queued", epochs=1))
    assert tl.cancel_job(queued.id).state == pb.JOB_STATE_CANCELLED
    for job in busy:
        tl.cancel_job(job.id)
    for job in busy:
        assert wait_for(tl, job.id, timeout=30).state == pb.JOB_STATE_CANCELLED


def worker_pid(home, job_id: str, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sqlite3.connect(home / "tlserve.db") as db:
            row = db.execute("SELECT worker_pid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row and row[0]:
            return row[0]
        time.sleep(0.1)
    raise AssertionError("the worker never started")


def test_a_worker_killed_by_the_kernel_fails_the_job_and_the_server_keeps_serving(tl, dataset, server):
    job = tl.fine_tune(tiny_request(dataset.id, "oom", epochs=200))
    for event in tl.watch_job(job.id):
        if event.phase == pb.JOB_PHASE_TRAINING:
            break
    os.kill(worker_pid(server.home, job.id), signal.SIGKILL)  # what the OOM killer does
    job = wait_for(tl, job.id, timeout=30)
    assert job.state == pb.JOB_STATE_FAILED
    assert "killed by SIGKILL" in job.error
    assert tl.health() == "SERVING"


@pytest.mark.parametrize(
    ("change", "code", "fragment"),
    [
        ({"dataset": "nope"}, grpc.StatusCode.NOT_FOUND, "nope"),
        ({"backbone": "resnet9000"}, grpc.StatusCode.INVALID_ARGUMENT, "resnet18"),
        ({"model_name": "../evil"}, grpc.StatusCode.INVALID_ARGUMENT, "model_name"),
        ({"epochs": 0}, grpc.StatusCode.INVALID_ARGUMENT, "epochs"),
        ({"min_steps_per_epoch": 0}, grpc.StatusCode.INVALID_ARGUMENT, "training.min_steps_per_epoch"),
        ({"devices": 999}, grpc.StatusCode.INVALID_ARGUMENT, "devices"),
        ({"weights": pb.WeightsSource(torchvision="DEFAULT")}, grpc.StatusCode.FAILED_PRECONDITION, "weights"),
        ({"weights": pb.WeightsSource(torchvision="NOPE")}, grpc.StatusCode.INVALID_ARGUMENT, "IMAGENET1K_V1"),
        ({"weights": pb.WeightsSource(file="../../etc/passwd")}, grpc.StatusCode.INVALID_ARGUMENT, "data root"),
        ({"weights": pb.WeightsSource(file="absent.pt")}, grpc.StatusCode.NOT_FOUND, "absent.pt"),
        ({"weights": pb.WeightsSource(model=pb.ModelRef(name="ghost"))}, grpc.StatusCode.NOT_FOUND, "ghost"),
    ],
    ids=["dataset", "backbone", "model_name", "epochs", "min-steps", "devices", "uncached", "weights-name", "file-escape",
         "file-absent", "parent-model"],
)
def test_bad_finetune_requests_get_a_clear_status_and_queue_nothing(tl, dataset, change, code, fragment):
    before = len(tl.list_jobs(page_size=1000).jobs)
    request = tiny_request(dataset.id, "bad")
    for key, value in change.items():
        if key == "weights":
            request.weights.CopyFrom(value)
        elif key in ("epochs", "min_steps_per_epoch"):
            setattr(request.training, key, value)
        else:
            setattr(request, key, value)
    with pytest.raises(tlclient.TLServeError) as e:
        tl.fine_tune(request)
    assert e.value.code == code, e.value
    assert fragment in e.value.message
    assert len(tl.list_jobs(page_size=1000).jobs) == before


def test_a_bad_upload_is_rejected_and_leaves_nothing(tl, server, tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a/x.png", b"not really")
        z.writestr("../escape/b/y.png", b"nope")
    before = {d.id for d in tl.list_datasets().datasets}
    files_before = sorted(p.name for p in (server.home / "datasets").iterdir())
    with pytest.raises(tlclient.TLServeError) as e:
        tl.upload_dataset(archive, "evil")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and ".." in e.value.message
    assert {d.id for d in tl.list_datasets().datasets} == before
    assert sorted(p.name for p in (server.home / "datasets").iterdir()) == files_before
    assert tl.health() == "SERVING"


def test_unknown_job_and_model_are_not_found(tl):
    for call in (lambda: tl.get_job("job-00000000"), lambda: tl.cancel_job("job-00000000"),
                 lambda: list(tl.watch_job("job-00000000")), lambda: tl.get_model("ghost:3")):
        with pytest.raises(tlclient.TLServeError) as e:
            call()
        assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_kill_9_of_the_server_then_restart_resumes_the_job(tmp_path, data_root):
    home = tmp_path / "home"
    server = ServerProcess(home, "--data-root", str(data_root)).start()
    with tlclient.Client(server.address, timeout=60) as tl:
        dataset = tl.upload_dataset(data_root / "shapes", "shapes")
        job = tl.fine_tune(tiny_request(dataset.id, "resumed", epochs=6))
        for event in tl.watch_job(job.id):
            if event.phase == pb.JOB_PHASE_TRAINING and event.epoch >= 2 and event.val_accuracy >= 0:
                break
        pid = worker_pid(home, job.id)
    server.proc.kill()  # kill -9: no drain, no goodbye
    server.proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    assert not alive(pid), "the worker outlived its server"
    server = ServerProcess(home, "--data-root", str(data_root)).start()
    try:
        with tlclient.Client(server.address, timeout=60) as tl:
            job = wait_for(tl, job.id)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            assert job.attempts == 2
            assert tl.get_model("resumed").lineage.hyperparameters.training.epochs == 6
    finally:
        assert server.terminate() == 0


def test_two_devices_run_under_torchrun_and_publish_one_model(tl, dataset):
    # On this CPU-only machine each device is a gloo process; the engine's own
    # test (test_training_ddp.py) checks that 2 processes match 1.
    job = wait_for(tl, tl.fine_tune(tiny_request(dataset.id, "ddp", epochs=1, devices=2)).id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    model = tl.get_model("ddp")
    assert model.lineage.hyperparameters.devices == 2 and model.version == 1
