"""Jobs, events and model versions in the metadata store (no server, no training)."""

from __future__ import annotations

import threading

import pytest

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.errors import InvalidArgument, NotFound
from tlserve.service.store import ArtifactStore, MetadataStore
from tlserve.service.store.jobs import JobStore
from tlserve.service.store.models import ModelStore, model_dir


@pytest.fixture
def metadata(tmp_path):
    store = MetadataStore(tmp_path / "db")
    yield store
    store.close()


@pytest.fixture
def jobs(metadata):
    return JobStore(metadata)


def request(**kw) -> pb.FineTuneRequest:
    return pb.FineTuneRequest(dataset="ds-1", model_name="m", backbone="resnet18", **kw)


def test_created_job_is_queued_with_a_replayable_first_event(jobs):
    job, created = jobs.create(request(), "ds-1")
    assert created and job.id.startswith("job-") and job.state == pb.JOB_STATE_QUEUED
    assert jobs.get(job.id).progress.state == pb.JOB_STATE_QUEUED
    assert jobs.ids_in_state(pb.JOB_STATE_QUEUED) == [job.id]


def test_same_idempotency_key_returns_the_first_job(jobs):
    first, created = jobs.create(request(idempotency_key="k1"), "ds-1")
    again, created_again = jobs.create(request(idempotency_key="k1"), "ds-1")
    assert created and not created_again and again.id == first.id
    other, _ = jobs.create(request(idempotency_key="k2"), "ds-1")
    assert other.id != first.id


def test_events_get_consecutive_sequences_and_become_progress(jobs):
    job, _ = jobs.create(request(), "ds-1")
    jobs.transition(job.id, pb.JOB_STATE_RUNNING)
    for epoch in (1, 2):
        jobs.append_event(job.id, pb.JobEvent(phase=pb.JOB_PHASE_TRAINING, epoch=epoch, val_accuracy=0.5 * epoch))
    events = jobs.events_after(job.id, 0)
    assert [e.sequence for e in events] == [1, 2, 3]
    assert [e.epoch for e in events] == [0, 1, 2]
    assert all(e.state == pb.JOB_STATE_RUNNING for e in events)
    assert jobs.get(job.id).progress.epoch == 2
    assert [e.sequence for e in jobs.events_after(job.id, 2)] == [3]


def test_terminal_state_sticks(jobs):
    job, _ = jobs.create(request(), "ds-1")
    jobs.transition(job.id, pb.JOB_STATE_CANCELLED, message="cancelled")
    after = jobs.transition(job.id, pb.JOB_STATE_SUCCEEDED)
    assert after.state == pb.JOB_STATE_CANCELLED and after.HasField("end_time")
    late = jobs.append_event(job.id, pb.JobEvent(state=pb.JOB_STATE_RUNNING, epoch=3))
    assert late.state == pb.JOB_STATE_CANCELLED


def test_concurrent_reporters_never_share_a_sequence(tmp_path):
    path = tmp_path / "db"
    job, _ = JobStore(MetadataStore(path)).create(request(), "ds-1")

    def report():
        # A separate connection per thread, like separate worker processes.
        store = JobStore(MetadataStore(path))
        for i in range(20):
            store.append_event(job.id, pb.JobEvent(step=i))

    threads = [threading.Thread(target=report) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sequences = [e.sequence for e in JobStore(MetadataStore(path)).events_after(job.id, 0)]
    assert sequences == list(range(1, 61))


def test_cancel_flag_and_list_filters(jobs):
    a, _ = jobs.create(request(), "ds-1")
    b, _ = jobs.create(request(), "ds-2")
    jobs.transition(b.id, pb.JOB_STATE_RUNNING)
    jobs.request_cancel(a.id)
    assert jobs.cancel_requested(a.id) and not jobs.cancel_requested(b.id)
    running, token = jobs.list(pb.JOB_STATE_RUNNING, 0, "")
    assert [j.id for j in running] == [b.id] and token == ""
    first, token = jobs.list(0, 1, "")
    second, last = jobs.list(0, 1, token)
    assert {first[0].id, second[0].id} == {a.id, b.id} and last == ""
    assert jobs.uses_dataset("ds-2") == [b.id]


def test_unknown_job_and_bad_page_token(jobs):
    with pytest.raises(NotFound, match="job 'job-nope' does not exist"):
        jobs.get("job-nope")
    with pytest.raises(InvalidArgument, match="page_token"):
        jobs.list(0, 10, "garbage")


@pytest.fixture
def models(metadata, tmp_path):
    return ModelStore(metadata, ArtifactStore(tmp_path / "artifacts"))


def publish(models, name="m", data=b"weights"):
    version = models.next_version(name)
    ref = pb.ModelRef(name=name, version=version)
    path = f"{model_dir(name, version)}/model.pt"
    info = models._artifacts.publish_bytes(data, path)
    artifact = pb.ModelArtifact(model=ref, format=pb.ARTIFACT_FORMAT_PYTORCH, size_bytes=info.size_bytes, sha256=info.sha256)
    return models.publish(pb.Model(name=name, version=version, backbone="resnet18"), [(artifact, path)])


def test_versions_count_up_per_name_and_latest_resolves(models):
    assert [publish(models).version for _ in range(3)] == [1, 2, 3]
    assert publish(models, "other").version == 1
    assert models.get("m").version == 3
    assert models.get("m", 2).artifacts[0].size_bytes == len(b"weights")
    with pytest.raises(NotFound, match="model 'm' version 9"):
        models.get("m", 9)
    with pytest.raises(NotFound, match="model 'x'"):
        models.get("x")


def test_list_models_latest_only(models):
    for _ in range(2):
        publish(models)
    publish(models, "b")
    everything, _ = models.list("", False, 0, "")
    assert [(m.name, m.version) for m in everything] == [("b", 1), ("m", 2), ("m", 1)]
    latest, _ = models.list("", True, 0, "")
    assert [(m.name, m.version) for m in latest] == [("b", 1), ("m", 2)]


def test_delete_needs_a_version_or_all_versions_and_removes_files(models, tmp_path):
    for _ in range(2):
        publish(models)
    with pytest.raises(InvalidArgument, match="all_versions"):
        models.delete(pb.ModelRef(name="m"), all_versions=False)
    assert models.delete(pb.ModelRef(name="m", version=1), False) == [pb.ModelRef(name="m", version=1)]
    assert not (tmp_path / "artifacts" / "models" / "m" / "1").exists()
    assert models.get("m").version == 2
    models.delete(pb.ModelRef(name="m"), all_versions=True)
    with pytest.raises(NotFound):
        models.get("m")
    assert not (tmp_path / "artifacts" / "models" / "m" / "2").exists()


def test_a_page_of_jobs_ends_before_it_would_pass_what_a_default_client_receives(jobs):
    """Labels at their limits make a job about 20 KB: 300 of them in one page of 1,000
    would be 6 MB, over the 4 MB a default gRPC client accepts."""
    from tlserve.service.store import paging

    labels = {f"team.example/k{i:02d}": "v" * 256 for i in range(64)}
    for _ in range(300):
        jobs.create(request(labels=labels), "ds-1")
    seen, token, pages = 0, "", 0
    while True:
        page, token = jobs.list(0, 1000, token)
        assert sum(j.ByteSize() for j in page) <= paging.PAGE_BYTES and page
        seen, pages = seen + len(page), pages + 1
        if not token:
            break
    assert seen == 300 and pages >= 2
    assert len(jobs.list(0, 10, "")[0]) == 10  # small pages are unchanged


def test_fit_keeps_at_least_one_item_and_stops_at_the_budget():
    from tlserve.service.store.paging import fit

    assert fit([5, 5, 5], lambda n: n, budget=10) == 2
    assert fit([50], lambda n: n, budget=10) == 1
    assert fit([], lambda n: n, budget=10) == 0


def test_publishers_of_one_name_at_once_get_their_own_versions_and_their_own_files(metadata, tmp_path):
    """Two jobs finishing at once used to take the same next version, both write
    models/NAME/V/model.pt (the second over the first), and one then move to V+1:
    version V's row described the other job's file. Each now gets its own."""
    import concurrent.futures
    import hashlib

    from tlserve.service.variant import Variant

    artifacts = ArtifactStore(tmp_path / "artifacts")
    other = MetadataStore(metadata.path)  # a second connection, as a second worker process has
    stores = [ModelStore(metadata, artifacts), ModelStore(other, artifacts)]

    def publish(i: int) -> pb.Model:
        model = pb.Model(name="m", backbone="resnet18", job_id=f"job-{i}")
        return stores[i % 2].publish_next_version(model, pb.ModelArtifact(), f"weights {i}".encode() * 1000,
                                                  Variant.PYTORCH)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        published = list(pool.map(publish, range(16)))
    assert sorted(m.version for m in published) == list(range(1, 17))
    for model in published:
        [artifact] = model.artifacts
        data = artifacts.path(model_dir("m", model.version) + "/" + Variant.PYTORCH.file_name).read_bytes()
        assert data == f"weights {model.job_id.removeprefix('job-')}".encode() * 1000
        assert hashlib.sha256(data).hexdigest() == artifact.sha256
    assert not list(artifacts.root.rglob(".tmp-*"))
    other.close()
