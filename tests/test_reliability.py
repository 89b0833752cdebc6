"""Defects found by a hostile-input and fault pass, each reproduced against a real
server: one server per home, thin images, unbounded labels, out-of-range enums,
dataset names that are path components."""

from __future__ import annotations

import io
import signal
import subprocess
import sys

import grpc
import pytest
from PIL import Image

import tlserve.client as tlclient
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tests.serverproc import ServerProcess


def start_second(home, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tlserve.service", "--home", str(home), "--grpc-address", "127.0.0.1:0",
         "--metrics-address", "127.0.0.1:0", "--ready-file", str(tmp_path / "second.ready.json")],
        capture_output=True, text=True, timeout=120,
    )


def test_a_second_server_on_the_same_home_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    home = tmp_path / "home"
    first = ServerProcess(home).start()
    try:
        second = start_second(home, tmp_path)
        assert second.returncode == 2, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"tlserve: error: another tlserve server (pid {first.proc.pid}) is using the home {home}: "
            "one server per home (set --home or TLSERVE_HOME)"]
        with tlclient.Client(first.address, timeout=10) as tl:  # the first one is untouched
            assert tl.health() == "SERVING" and tl.list_datasets().datasets == []
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    # The kernel dropped the lock with the process: a new server starts at once.
    again = ServerProcess(home).start()
    assert again.terminate() == 0, again.log()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("reliability") / "home").start()
    yield proc
    assert proc.terminate() == 0, proc.log()


def code_and_message(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(tlclient.TLServeError) as e:
        call()
    return e.value.code, e.value.message


@pytest.mark.parametrize("labels, says", [
    ({f"k{i}": "v" for i in range(65)}, "labels: 65 entries, at most 64"),
    ({"k" * 64: "v"}, "must be 1 to 63 letters"),
    ({"-team": "v"}, "starting and ending with a letter or digit"),
    ({"team": "v" * 257}, "the value of 'team' is 257 characters, at most 256"),
    ({"team": "a\nb"}, "control character"),
    ({"team": "x" * (10 << 20)}, "at most 256"),  # the 10 MB that broke ListJobs
])
def test_fine_tune_labels_are_bounded_like_kubernetes_labels(tl, labels, says):
    before = tl.list_jobs().jobs
    code, message = code_and_message(lambda: tl.fine_tune(dataset="nope", model_name="m", backbone="resnet18",
                                                          labels=labels))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and says in message, message
    assert tl.list_jobs().jobs == before


def test_labels_at_the_limits_pass_validation(tl):
    labels = {f"team.example/k{i:02d}": "v" * 256 for i in range(64)}
    code, message = code_and_message(lambda: tl.fine_tune(dataset="nope", model_name="m", backbone="resnet18",
                                                          labels=labels))
    assert code == grpc.StatusCode.NOT_FOUND, message  # the labels passed; the dataset does not exist


def test_an_overlong_idempotency_key_is_refused(tl):
    code, message = code_and_message(lambda: tl.fine_tune(dataset="nope", model_name="m", backbone="resnet18",
                                                          idempotency_key="k" * 129))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "idempotency_key is 129 characters" in message


def test_list_jobs_with_a_state_that_does_not_exist_is_invalid(server):
    with grpc.insecure_channel(server.address) as channel:
        from tlserve.client.tlserve.v1 import tlserve_pb2_grpc

        stub = tlserve_pb2_grpc.TLServeStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListJobs(pb.ListJobsRequest(state=99), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "state 99 is not a JobState" in e.value.details()
        assert stub.ListJobs(pb.ListJobsRequest(state=pb.JOB_STATE_QUEUED), timeout=10).jobs == []


@pytest.mark.parametrize("name", [".", "..", ".hidden", "-x", "_x"])
def test_dataset_names_that_are_path_components_are_refused(tl, tmp_path, name):
    folder = tmp_path / "ds"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (200 if label == "a" else 0, 0, 0)).save(buffer, "PNG")
            (folder / split / label / "1.png").write_bytes(buffer.getvalue())
    code, message = code_and_message(lambda: tl.upload_dataset(folder, name=name))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "starting with a letter or digit" in message, message
    assert all(d.name != name for d in tl.list_datasets().datasets)
