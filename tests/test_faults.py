"""kill -9 of the server in the middle of an upload, an INT8 export and a profile:
nothing half-done is published, nothing stored before is lost, no child process
outlives it, and the next start cleans up what the crash left."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

import tlserve.client as tlclient
from tlserve.service.profiling.profile import MAX_ITERATIONS
from tlserve.service.store.artifacts import TEMP_PREFIX
from tests.modelfactory import published_model
from tests.serverproc import ServerProcess, alive

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc for child processes")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc's parent links."""
    parents: dict[int, int] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def tree_digest(root: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def kill_when(server: ServerProcess, ready, timeout: float = 120) -> None:
    """SIGKILL the server as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "the operation never got under way"
        time.sleep(0.005)
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()


def in_thread(fn) -> threading.Thread:
    def run():
        try:
            fn()
        except tlclient.TLServeError:
            pass  # the server died under the call: what the test is about

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def noise_images(folder: pathlib.Path, per_class: int = 12, size: int = 96) -> None:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(per_class):  # noise: PNG cannot compress it, so the upload takes many chunks
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")


def test_kill_9_during_an_upload_loses_nothing_and_the_next_start_removes_the_partial_file(tmp_path):
    home = tmp_path / "home"
    noise_images(tmp_path / "keep")
    noise_images(tmp_path / "doomed", per_class=40)
    server = ServerProcess(home).start()
    with tlclient.Client(server.address, timeout=60) as tl:
        kept = tl.upload_dataset(tmp_path / "keep", name="keep")
    kept_files = tree_digest(home / "datasets" / kept.id)
    uploads = home / "datasets" / ".uploads"
    sent = [0]

    def progress(done: int, total: int) -> None:
        sent[0] = done
        time.sleep(0.01)  # slow enough to be caught half-way

    tl = tlclient.Client(server.address, timeout=60)
    thread = in_thread(lambda: tl.upload_dataset(tmp_path / "doomed", name="doomed", chunk_size=32 << 10,
                                                 progress=progress))
    kill_when(server, lambda: sent[0] > 256 << 10 and any(uploads.iterdir()))
    thread.join(30)
    tl.close()
    assert any(p.stat().st_size for p in uploads.iterdir()), "the kill was meant to interrupt the upload"

    again = ServerProcess(home).start()
    try:
        with tlclient.Client(again.address, timeout=60) as tl:
            assert [d.name for d in tl.list_datasets().datasets] == ["keep"]
        assert list(uploads.iterdir()) == []
        assert sorted(p.name for p in (home / "datasets").iterdir()) == sorted([".uploads", kept.id])
        assert tree_digest(home / "datasets" / kept.id) == kept_files
    finally:
        assert again.terminate() == 0, again.log()


@pytest.fixture(scope="module")
def model_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("faults") / "home"
    published_model(home, images_per_class=8, epochs=1)
    return home


def test_kill_9_during_an_int8_export_publishes_nothing_and_leaves_no_temp_files(model_home):
    server = ServerProcess(model_home, "--data-root", str(model_home / "data")).start()
    with tlclient.Client(server.address, timeout=60) as tl:
        before = tl.get_model("shapes", version=1)
    artifacts_before = tree_digest(model_home / "artifacts")
    scratch = model_home / "tmp"
    tl = tlclient.Client(server.address, timeout=300)
    thread = in_thread(lambda: tl.export_model("shapes", version=1, precision="int8"))
    kill_when(server, lambda: scratch.is_dir() and any(scratch.iterdir()))  # calibration under way
    thread.join(30)
    tl.close()

    again = ServerProcess(model_home, "--data-root", str(model_home / "data")).start()
    try:
        with tlclient.Client(again.address, timeout=60) as tl:
            after = tl.get_model("shapes", version=1)
        assert [a.sha256 for a in after.artifacts] == [a.sha256 for a in before.artifacts]
        assert tree_digest(model_home / "artifacts") == artifacts_before
        assert list(scratch.iterdir()) == []
    finally:
        assert again.terminate() == 0, again.log()


def test_kill_9_during_profiling_leaves_no_child_process(model_home):
    server = ServerProcess(model_home, "--data-root", str(model_home / "data")).start()
    baseline = descendants(server.proc.pid)  # e.g. multiprocessing's resource tracker
    tl = tlclient.Client(server.address, timeout=300)
    thread = in_thread(lambda: tl.profile_model("shapes", version=1, iterations=MAX_ITERATIONS))
    children: set[int] = set()
    deadline = time.monotonic() + 120
    while not children - baseline:  # the profiling child has started
        assert time.monotonic() < deadline, "profiling never started a child process"
        children = descendants(server.proc.pid)
        time.sleep(0.01)
    time.sleep(0.5)  # and is under way
    children = descendants(server.proc.pid) | children
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    thread.join(30)
    tl.close()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in children if alive(pid)], "a child outlived the killed server"


# -- a full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own (remountable to any size), where this machine lets us mount one."""
    import shutil
    import subprocess

    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")

    def fill_to(free_bytes: int) -> None:
        """Shrinks the disk to what it holds now plus `free_bytes`."""
        used = shutil.disk_usage(mount_point).used
        subprocess.run(["mount", "-o", f"remount,size={used + free_bytes}", str(mount_point)], check=True)

    yield mount_point, fill_to
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_during_an_upload_refuses_it_and_keeps_serving(small_disk, tmp_path):
    disk, fill_to = small_disk
    noise_images(tmp_path / "keep", per_class=4, size=32)
    noise_images(tmp_path / "big", per_class=30, size=128)  # about 3 MB
    server = ServerProcess(disk / "home").start()
    try:
        with tlclient.Client(server.address, timeout=60) as tl:
            kept = tl.upload_dataset(tmp_path / "keep", name="keep")
            files = tree_digest(disk / "home" / "datasets" / kept.id)
            fill_to(1 << 20)
            with pytest.raises(tlclient.TLServeError) as e:
                tl.upload_dataset(tmp_path / "big", name="big")
            assert e.value.code.name == "RESOURCE_EXHAUSTED" and "disk" in e.value.message, e.value.message
            assert [d.name for d in tl.list_datasets().datasets] == ["keep"] and tl.health() == "SERVING"
        assert list((disk / "home" / "datasets" / ".uploads").iterdir()) == []
        assert tree_digest(disk / "home" / "datasets" / kept.id) == files
    finally:
        assert server.terminate() == 0, server.log()


def test_a_full_disk_during_an_export_is_resource_exhausted_and_publishes_nothing(small_disk):
    disk, fill_to = small_disk
    home = disk / "home"
    published_model(home, images_per_class=8, epochs=1, backbone="mobilenet_v3_small")
    fill_to(2 << 20)  # the FP32 graph alone is about 6 MB
    server = ServerProcess(home, "--data-root", str(home / "data")).start()
    try:
        with tlclient.Client(server.address, timeout=120) as tl:
            before = tl.get_model("shapes", version=1)
            for precision in ("fp32", "int8"):
                with pytest.raises(tlclient.TLServeError) as e:
                    tl.export_model("shapes", version=1, precision=precision)
                assert e.value.code.name == "RESOURCE_EXHAUSTED", e.value.message
                assert "ExportModel: the server's disk is full" in e.value.message
            assert list(tl.get_model("shapes", version=1).artifacts) == list(before.artifacts)
            assert tl.health() == "SERVING"
        assert list((home / "tmp").iterdir()) == []
        assert not [p for p in (home / "artifacts").rglob(f"{TEMP_PREFIX}*")]
    finally:
        assert server.terminate() == 0, server.log()


# -- SIGTERM under load ---------------------------------------------------------------------


def test_sigterm_with_predictions_and_a_job_in_flight_drains_and_the_job_resumes(model_home):
    """Predictions in flight finish or are refused cleanly (never INTERNAL), the server
    exits 0 within the grace period, and the job it was running resumes at the next start."""
    import io

    import grpc

    from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

    args = ("--data-root", str(model_home / "data"), "--grace-seconds", "5")
    server = ServerProcess(model_home, *args).start()
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image, "PNG")
    with tlclient.Client(server.address, timeout=120) as tl:
        tl.export_model("shapes", version=1, precision="fp32")
        dataset = tl.get_model("shapes", version=1).lineage.dataset_id
        job = tl.fine_tune(pb.FineTuneRequest(
            dataset=dataset, model_name="resumed", backbone="resnet18", image_size=32, seed=3,
            weights=pb.WeightsSource(scratch=pb.WeightsSource.Scratch()), strategy=pb.STRATEGY_FULL,
            training=pb.TrainingOptions(epochs=4, batch_size=8)))
        for event in tl.watch_job(job.id):
            if event.phase == pb.JOB_PHASE_TRAINING:
                break
    codes: list[grpc.StatusCode] = []
    stop = threading.Event()

    def predict_loop() -> None:
        with tlclient.Client(server.address, timeout=30) as client:
            while not stop.is_set():
                try:
                    client.predict("shapes:1", [image.getvalue()] * 4)
                    codes.append(grpc.StatusCode.OK)
                except tlclient.TLServeError as e:
                    codes.append(e.code)
                    if e.code == grpc.StatusCode.UNAVAILABLE:
                        return  # the server has gone

    threads = [threading.Thread(target=predict_loop, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while codes.count(grpc.StatusCode.OK) < 8:
        assert time.monotonic() < deadline, f"predictions did not get through: {codes}"
        time.sleep(0.05)
    started = time.monotonic()
    code = server.terminate(timeout=60)
    stop.set()
    for t in threads:
        t.join(30)
    assert code == 0, server.log()
    assert time.monotonic() - started < 30
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, codes

    again = ServerProcess(model_home, *args).start()
    try:
        with tlclient.Client(again.address, timeout=60) as tl:
            deadline = time.monotonic() + 240
            while (job := tl.get_job(job.id)).state not in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED,
                                                           pb.JOB_STATE_CANCELLED):
                assert time.monotonic() < deadline, job
                time.sleep(0.5)
            assert job.state == pb.JOB_STATE_SUCCEEDED and job.attempts == 2, job.error
            assert tl.predict("shapes:1", [image.getvalue()]).predictions
    finally:
        assert again.terminate() == 0, again.log()
