"""Integration tests: a real server process on port 0, called over a real channel."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.client.tlserve.v1 import tlserve_pb2_grpc
from tlserve.service.api.servicer import TLServeServicer

TLSERVE = "tlserve.v1.TLServe"


@pytest.fixture
def channel(live_server):
    with grpc.insecure_channel(live_server.address) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return tlserve_pb2_grpc.TLServeStub(channel)


def scrape(metrics_address: str) -> str:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as response:
        return response.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


@pytest.mark.parametrize("service", ["", TLSERVE])
def test_health_reports_serving_once_ready(channel, service):
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_unknown_service_is_not_found(channel):
    with pytest.raises(grpc.RpcError) as e:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope.Nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services_and_describes_the_api(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {TLSERVE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    from google.protobuf.descriptor_pool import DescriptorPool

    service = DescriptorPool(db).FindServiceByName(TLSERVE)
    assert {m.name for m in service.methods} == set(pb.DESCRIPTOR.services_by_name["TLServe"].methods_by_name)


def test_server_info_describes_versions_and_devices(stub):
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    assert info.torch_version.startswith("2.")
    assert info.onnxruntime_version
    assert info.devices[0].name == "cpu"
    assert info.onnxruntime_providers[-1] == "CPUExecutionProvider"
    assert info.max_receive_message_bytes == 64 * 1024 * 1024
    assert info.start_time.seconds > 0


def test_list_backbones_covers_torchvision_with_true_metadata(stub):
    import torchvision

    response = stub.ListBackbones(pb.ListBackbonesRequest(), timeout=60)
    names = {b.name for b in response.backbones}
    assert names == set(torchvision.models.list_models(module=torchvision.models))
    resnet50 = next(b for b in response.backbones if b.name == "resnet50")
    meta = torchvision.models.ResNet50_Weights.DEFAULT.meta
    assert resnet50.family == "resnet"
    assert resnet50.parameter_count == meta["num_params"]
    assert resnet50.gflops == pytest.approx(meta["_ops"])
    assert resnet50.imagenet_top1_accuracy == pytest.approx(meta["_metrics"]["ImageNet-1K"]["acc@1"] / 100)
    assert resnet50.input_size == 224
    assert resnet50.file_size_bytes > 90e6
    assert not resnet50.cached  # nothing is provisioned in a fresh home
    assert {w.name for w in resnet50.weights} == {"ResNet50_Weights.IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"}
    assert response.weights_cache_dir.endswith("weights")


def test_list_backbones_filters_by_family(stub):
    response = stub.ListBackbones(pb.ListBackbonesRequest(family="mobilenet_v3"), timeout=60)
    assert sorted(b.name for b in response.backbones) == ["mobilenet_v3_large", "mobilenet_v3_small"]


def test_every_tlserve_rpc_is_implemented():
    """No RPC falls back to the generated base class, which answers UNIMPLEMENTED."""
    from tlserve.client.tlserve.v1 import tlserve_pb2_grpc

    methods = pb.DESCRIPTOR.services_by_name["TLServe"].methods_by_name
    assert len(methods) >= 21
    missing = [m for m in methods
               if getattr(TLServeServicer, m) is getattr(tlserve_pb2_grpc.TLServeServicer, m)]
    assert missing == []


def test_metrics_count_calls_by_method_and_code(live_server, stub):
    method = f"{TLSERVE}/GetServerInfo"
    before = sample(scrape(live_server.metrics_address), "tlserve_grpc_requests_total", method=method, code="OK")
    for _ in range(3):
        stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Predict(pb.PredictRequest(), timeout=30)
    text = scrape(live_server.metrics_address)
    assert sample(text, "tlserve_grpc_requests_total", method=method, code="OK") == before + 3
    # An empty PredictRequest names no model: a user error, counted under its code.
    assert sample(text, "tlserve_grpc_requests_total", method=f"{TLSERVE}/Predict", code="INVALID_ARGUMENT") >= 1
    assert sample(text, "tlserve_grpc_request_duration_seconds_count", method=method) >= 3
    assert sample(text, "process_resident_memory_bytes") > 0


def test_request_id_is_echoed_or_made(stub):
    _, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), metadata=[("x-request-id", "abc-123")], timeout=30)
    assert ("x-request-id", "abc-123") in tuple(call.trailing_metadata())
    _, call = stub.GetServerInfo.with_call(pb.GetServerInfoRequest(), timeout=30)
    made = dict(call.trailing_metadata())["x-request-id"]
    assert len(made) == 16


def test_sigterm_drains_a_call_in_flight_and_exits_zero(server_factory):
    server = server_factory("--grace-seconds", "2")
    channel = grpc.insecure_channel(server.address)
    statuses: list[int] = []
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=TLSERVE), timeout=60)

    def follow():
        try:
            for response in watch:
                statuses.append(response.status)
        except grpc.RpcError:
            pass  # the server ends the stream after the grace period

    follower = threading.Thread(target=follow)
    follower.start()
    deadline = time.monotonic() + 10
    while not statuses and time.monotonic() < deadline:
        time.sleep(0.01)
    assert statuses == [health_pb2.HealthCheckResponse.SERVING]

    started = time.monotonic()
    code = server.terminate(timeout=30)
    follower.join(10)
    assert code == 0, server.log()
    # The in-flight stream was told NOT_SERVING, then the server waited the grace out.
    assert statuses == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING]
    assert time.monotonic() - started < 15
    assert '"message": "stopped"' in server.log()
    channel.close()


def test_new_calls_are_refused_while_draining(server_factory):
    server = server_factory("--grace-seconds", "3")
    channel = grpc.insecure_channel(server.address)
    stub = tlserve_pb2_grpc.TLServeStub(channel)
    stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    # Keep a call open so the server really drains for the grace period.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
    next(watch)
    server.proc.send_signal(signal.SIGTERM)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    fresh = grpc.insecure_channel(server.address)
    with pytest.raises(grpc.RpcError) as e:
        tlserve_pb2_grpc.TLServeStub(fresh).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.terminate() == 0
    channel.close()
    fresh.close()


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tlserve.service", "--metrics-address", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tlserve: error: ")
    return lines[0]


def test_malformed_address_is_one_clear_line(tmp_path):
    line = _one_line_error(_serve("--home", str(tmp_path), "--grpc-address", "localhost"))
    assert "--grpc-address" in line and "HOST:PORT" in line


def test_address_from_environment_is_validated_too(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tlserve.service", "--home", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TLSERVE_GRPC_ADDRESS": "127.0.0.1:99999", "PATH": "/usr/bin:/bin"},
    )
    assert "TLSERVE_GRPC_ADDRESS" in _one_line_error(result)


def test_port_in_use_is_one_clear_line(live_server, tmp_path):
    line = _one_line_error(_serve("--home", str(tmp_path), "--grpc-address", live_server.address))
    assert f"cannot listen for gRPC on {live_server.address}" in line


def test_unwritable_home_is_one_clear_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = _one_line_error(_serve("--home", str(blocker / "home"), "--grpc-address", "127.0.0.1:0"))
    assert "home directory" in line and "not usable" in line
