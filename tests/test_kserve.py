"""tlserve through the KServe v2 / Triton protocol, called with tritonclient itself,
as a Triton user (or perf_analyzer) would: health, metadata, configuration,
inference that agrees with tlserve's own Predict, statistics, and the status
codes of the usual mistakes; and Triton's perf_analyzer driving it unchanged.

The server's home is made by `tests/modelfactory.published_model` (model "shapes"
v1, resnet18 at 32 px, three classes); the module exports its FP32 ONNX variant
with the embedding output, and one taking uint8 NHWC pixels, once, through
tlserve's own API.

tritonclient's protos are loaded into a private descriptor pool
(`tritonclient_grpc`): they and tlserve's stubs both define package `inference`.
"""

from __future__ import annotations

import queue
import time

import grpc
import numpy as np
import pytest

import tlserve.client as tlclient
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tests.modelfactory import published_model
from tests.serverproc import ServerProcess, serving
from tests.test_kserve_unit import tritonclient_grpc

tc = tritonclient_grpc()
from tritonclient.utils import InferenceServerException  # noqa: E402  (after tritonclient.grpc's private pool)

SIZE = 32


@pytest.fixture(scope="module")
def exported_server(tmp_path_factory):
    """A server (two CPU lanes) whose model "shapes" v1 has an FP32 ONNX export with the
    embedding, and one taking uint8 NHWC pixels."""
    home = tmp_path_factory.mktemp("kserve") / "home"
    settings, _ = published_model(home)
    server = ServerProcess(home, "--data-root", str(settings.data_root), "--cpu-lanes", "2").start()
    try:
        with tlclient.Client(server.address, timeout=300) as tl:
            tl.export_model("shapes", precision="fp32", include_embedding=True)
            tl.export_model("shapes", precision="fp32", input_format="uint8_nhwc")
    except BaseException:
        server.kill()
        raise
    yield server
    assert server.terminate() == 0, server.log()


@pytest.fixture(scope="module")
def triton(exported_server):
    client = tc.InferenceServerClient(exported_server.address)
    yield client
    client.close()


@pytest.fixture(scope="module")
def tl(exported_server):
    with tlclient.Client(exported_server.address, timeout=120) as c:
        yield c


def prepared(batch: int, seed: int = 0) -> np.ndarray:
    """Normalised float32 images, (N, 3, S, S): what the FP32 export takes."""
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)


def fp32_input(x: np.ndarray):
    tensor = tc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def status_of(error: pytest.ExceptionInfo) -> str:
    return error.value.status()


def test_server_is_live_ready_and_says_what_it_serves(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    metadata = triton.get_server_metadata(as_json=True)
    assert metadata["name"] == "tlserve" and metadata["version"]
    assert {"model_configuration", "statistics"} <= set(metadata["extensions"])


def test_model_ready_loads_the_export_and_is_false_for_what_is_not_there(triton):
    assert triton.is_model_ready("shapes")
    assert triton.is_model_ready("shapes", "1")
    assert not triton.is_model_ready("shapes@int8")  # not exported
    assert not triton.is_model_ready("shapes", "2")
    assert not triton.is_model_ready("no-such-model")


def test_model_metadata_and_config_describe_the_fp32_export(triton):
    metadata = triton.get_model_metadata("shapes", as_json=True)
    assert metadata["platform"] == "onnxruntime_onnx" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "3", str(SIZE), str(SIZE)]}]
    outputs = {o["name"]: o for o in metadata["outputs"]}
    assert outputs["logits"]["shape"] == ["-1", "3"] and outputs["embedding"]["datatype"] == "FP32"

    config = triton.get_model_config("shapes", as_json=True)["config"]
    assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] > 0
    assert config["input"] == [
        {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": ["3", str(SIZE), str(SIZE)]}
    ]
    assert "dynamic_batching" in config

    triton.infer("shapes", [fp32_input(prepared(1))])  # loaded: where it runs is known now
    config = triton.get_model_config("shapes", as_json=True)["config"]
    assert config["instance_group"] == [{"name": "shapes_0", "kind": "KIND_CPU", "count": 2}]


def test_infer_agrees_with_tlserves_own_predict(triton, tl):
    x = prepared(2)
    result = triton.infer(
        "shapes", [fp32_input(x)], request_id="k-1",
        outputs=[tc.InferRequestedOutput("logits"), tc.InferRequestedOutput("embedding")],
    )
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    assert result.as_numpy("embedding").shape[0] == 2
    assert result.get_response().id == "k-1" and result.get_response().model_version == "1"

    images = [
        pb.ImageInput(tensor=pb.Tensor(shape=[3, SIZE, SIZE], dtype=pb.DATA_TYPE_FLOAT32, data=image.tobytes()))
        for image in x
    ]
    response = tl.predict("shapes", images, return_logits=True, top_k=1)
    expected = np.array([list(p.logits) for p in response.predictions], np.float32)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    top1 = triton.infer("shapes", [fp32_input(x)], outputs=[tc.InferRequestedOutput("logits", class_count=1)])
    labels = [item.decode().split(":")[2] for item in top1.as_numpy("logits").ravel()]
    assert labels == [p.top_k[0].label for p in response.predictions]


def test_the_nhwc_name_takes_pixels_and_agrees_with_the_float_export(triton, tl):
    pixels = np.random.default_rng(3).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    metadata = triton.get_model_metadata("shapes@nhwc", as_json=True)
    assert metadata["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": ["-1", str(SIZE), str(SIZE), "3"]}]
    tensor = tc.InferInput("input", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    logits = triton.infer("shapes@nhwc", [tensor]).as_numpy("logits")

    # The same pixels through tlserve's own Predict, served by the float NCHW export.
    images = [pb.ImageInput(tensor=pb.Tensor(shape=[SIZE, SIZE, 3], dtype=pb.DATA_TYPE_UINT8, data=p.tobytes()))
              for p in pixels]
    response = tl.predict("shapes", images, return_logits=True)
    expected = np.array([list(p.logits) for p in response.predictions], np.float32)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    (entry,) = triton.get_inference_statistics("shapes@nhwc", as_json=True)["model_stats"]
    assert (entry["name"], entry["inference_count"]) == ("shapes@nhwc", "2")
    with pytest.raises(InferenceServerException) as e:
        triton.infer("shapes@int8-nhwc", [tensor])
    assert status_of(e) == str(grpc.StatusCode.FAILED_PRECONDITION)
    assert "--precision int8 --input-format uint8_nhwc" in e.value.message()


def test_statistics_count_the_images_inferred(triton):
    triton.infer("shapes", [fp32_input(prepared(1))])  # loaded and counted at least once

    def stats():
        (entry,) = triton.get_inference_statistics("shapes", "1", as_json=True)["model_stats"]
        return entry

    before = stats()
    for seed in range(3):
        triton.infer("shapes", [fp32_input(prepared(2, seed))])
    after = stats()
    assert (after["name"], after["version"]) == ("shapes", "1")
    assert int(after["inference_count"]) - int(before["inference_count"]) == 6
    assert 1 <= int(after["execution_count"]) - int(before["execution_count"]) <= 3
    successes = int(after["inference_stats"]["success"]["count"]) - int(before["inference_stats"]["success"]["count"])
    assert successes >= 3
    assert abs(int(after["last_inference"]) - time.time() * 1000) < 60_000
    assert any(m["name"] == "shapes" for m in triton.get_inference_statistics(as_json=True)["model_stats"])


@pytest.mark.parametrize(
    "model, tensor, status, words",
    [
        ("no-such-model", fp32_input(prepared(1)), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ("shapes", fp32_input(np.zeros((1, 3, 16, 16), np.float32)), grpc.StatusCode.INVALID_ARGUMENT,
         f"[-1, 3, {SIZE}, {SIZE}]"),
        ("shapes@int8", fp32_input(prepared(1)), grpc.StatusCode.FAILED_PRECONDITION, "int8"),
        ("shapes@fp64", fp32_input(prepared(1)), grpc.StatusCode.INVALID_ARGUMENT, "@fp16, @int8, @pytorch"),
    ],
    ids=["unknown-model", "wrong-shape", "int8-not-exported", "unknown-variant"],
)
def test_mistakes_get_their_status_codes(triton, model, tensor, status, words):
    with pytest.raises(InferenceServerException) as e:
        triton.infer(model, [tensor])
    assert status_of(e) == str(status)
    assert words.lower() in e.value.message().lower()


def test_uint8_data_for_the_fp32_export_is_refused_with_the_expected_spec(triton):
    tensor = tc.InferInput("input", [1, SIZE, SIZE, 3], "UINT8")
    tensor.set_data_from_numpy(np.zeros((1, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(InferenceServerException) as e:
        triton.infer("shapes", [tensor])
    assert status_of(e) == str(grpc.StatusCode.INVALID_ARGUMENT)
    assert f"'input' FP32 [-1, 3, {SIZE}, {SIZE}]" in e.value.message()


def test_stream_infer_answers_each_request_and_reports_a_bad_one_without_ending(triton):
    replies: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        triton.async_stream_infer("shapes", [fp32_input(prepared(1))], request_id="s-1")
        triton.async_stream_infer("no-such-model", [fp32_input(prepared(1))], request_id="s-2")
        triton.async_stream_infer("shapes", [fp32_input(prepared(3))], request_id="s-3")
        got = [replies.get(timeout=60) for _ in range(3)]
    finally:
        triton.stop_stream()
    (ok1, e1), (_, e2), (ok3, e3) = got
    assert e1 is None and ok1.get_response().id == "s-1" and ok1.as_numpy("logits").shape == (1, 3)
    assert e2 is not None and "no-such-model" in e2.message()
    assert e3 is None and ok3.as_numpy("logits").shape == (3, 3)


def perf_analyzer_tool() -> str:
    """Triton's perf_analyzer as scripts/get_perf_analyzer.sh installs it: skipped where
    it is missing, except under .ci/run (TLSERVE_REQUIRE_SYSTEM_TOOLS=1), which fetches it."""
    import os

    from bench.predict import PERF_ANALYZER as tool

    if not tool.exists():
        if os.environ.get("TLSERVE_REQUIRE_SYSTEM_TOOLS") or os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: .ci/run fetches it with scripts/get_perf_analyzer.sh")
        pytest.skip("perf_analyzer not installed (scripts/get_perf_analyzer.sh)")
    return str(tool)


def test_perf_analyzer_drives_the_server_unchanged(exported_server, tmp_path):
    """Triton's own load generator needs ServerMetadata, ModelMetadata, ModelConfig,
    ModelInfer and ModelStatistics to answer as Triton does; its report then carries
    the server-side times from ModelStatistics."""
    import subprocess

    csv_path = tmp_path / "perf.csv"
    out = subprocess.run(
        [perf_analyzer_tool(), "-m", "shapes", "-i", "grpc", "-u", exported_server.address,
         "--concurrency-range", "1:4:3", "--measurement-mode", "count_windows",
         "--measurement-request-count", "20", "--stability-percentage", "999", "-f", str(csv_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    header, *rows = csv_path.read_text().splitlines()
    table = [dict(zip(header.split(","), (float(v) for v in row.split(",")))) for row in rows]
    # perf_analyzer sorts its CSV rows by increasing throughput, not by concurrency.
    assert sorted(row["Concurrency"] for row in table) == [1, 4]
    for row in table:
        assert row["Inferences/Second"] > 0
        assert row["Server Compute Infer"] > 0  # microseconds, from ModelStatistics
        assert row["p50 latency"] >= row["Server Compute Infer"]


def test_the_protocol_follows_exports_and_deletes_without_a_restart(tmp_path):
    """ModelInfer reads model records from Predict's cache: an export published after the
    model was served is reachable at once, and a deleted model is NOT_FOUND at once."""
    home = tmp_path / "home"
    settings, _ = published_model(home)
    with serving(home, "--data-root", str(settings.data_root)) as server, \
            tlclient.Client(server.address, timeout=300) as tl:
        triton = tc.InferenceServerClient(server.address)
        try:
            tl.export_model("shapes", precision="fp32")
            x = prepared(2)
            served = triton.infer("shapes", [fp32_input(x)]).as_numpy("logits")
            with pytest.raises(InferenceServerException) as e:
                triton.infer("shapes@fp16", [fp32_input(x)])
            assert status_of(e) == str(grpc.StatusCode.FAILED_PRECONDITION)

            tl.export_model("shapes", precision="fp16")
            half = triton.infer("shapes@fp16", [fp32_input(x)]).as_numpy("logits")
            assert half.shape == served.shape
            assert np.abs(half - served).max() < 0.05 * max(1.0, np.abs(served).max())

            tl.delete_model("shapes", version=1)
            for name in ("shapes", "shapes@fp16"):
                with pytest.raises(InferenceServerException) as e:
                    triton.infer(name, [fp32_input(x)])
                assert status_of(e) == str(grpc.StatusCode.NOT_FOUND), name
            assert not triton.is_model_ready("shapes")
        finally:
            triton.close()
