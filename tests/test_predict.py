"""Export, download and Predict through the client against a live server, as a
backend service uses them: every input a user controls, good and bad, with the
status it gets, and the server still serving afterwards.

The server's home is made by `tests/modelfactory.published_model` (a resnet18
trained at 32 px on three procedural shapes), so the model is real and its
accuracy is above chance. The server runs with small limits (pixels, message
size, queue) so that those refusals can be reached with small inputs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import urllib.request

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import tlserve.client as tlclient
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.manifest import Manifest
from tlserve.service.server import CORE_RECEIVE_CAP_FACTOR
from tests.modelfactory import published_model
from tests.serverproc import serving

MAX_PIXELS = 100_000
MAX_MESSAGE = 2_000_000


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    home = tmp_path_factory.mktemp("predict") / "home"
    settings, model = published_model(home)
    return home, settings, model


@pytest.fixture(scope="module")
def server(made):
    home, settings, _ = made
    with serving(
        home, "--data-root", str(settings.data_root), "--max-image-pixels", str(MAX_PIXELS),
        "--max-receive-message-bytes", str(MAX_MESSAGE),
    ) as server:
        yield server


@pytest.fixture(scope="module")
def manifest(made):
    home, settings, model = made
    return Manifest.load(settings.datasets_dir / model.lineage.dataset_id / "manifest.json")


@pytest.fixture(scope="module")
def fp32(tl, made):
    """The FP32 export with the embedding output (module-wide: most tests predict with it)."""
    return tl.export_model("shapes", precision="fp32", include_embedding=True)


def png_bytes(path) -> bytes:
    return path.read_bytes()


def test_predict_before_any_export_names_the_export_to_run(tl):
    with pytest.raises(tlclient.TLServeError) as e:
        tl.predict("shapes", [b"\x89PNG"], precision="int8")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "ExportModel" in e.value.message and "int8" in e.value.message.lower()


def test_export_fp32_records_parity_accuracy_and_labels(fp32, made):
    _, _, model = made
    assert fp32.format == pb.ARTIFACT_FORMAT_ONNX and fp32.precision == pb.PRECISION_FP32
    assert fp32.parity.images_compared > 0
    assert fp32.parity.max_abs_logit_diff < 1e-3
    assert fp32.parity.top1_agreement == 1.0
    assert fp32.has_embedding
    assert list(fp32.class_names) == list(model.class_names)
    assert fp32.size_bytes > 1_000_000 and len(fp32.sha256) == 64
    assert fp32.inputs[0].shape[0] == -1  # dynamic batch
    assert abs(fp32.accuracy_delta_points) < 1e-6 + 100 / 12  # at most one test image of 12 differs


def test_download_streams_the_artifact_and_it_runs_at_two_batch_sizes(tl, fp32, tmp_path):
    target = tmp_path / "model.onnx"
    seen = []
    artifact = tl.download_model("shapes", target, precision="fp32", chunk_size_bytes=256 * 1024,
                                 progress=lambda done, total: seen.append(done))
    data = target.read_bytes()
    assert artifact.sha256 == fp32.sha256 == hashlib.sha256(data).hexdigest()
    assert len(seen) > 1  # it came in chunks
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        logits = session.run(["logits"], {"input": np.zeros((batch, 3, 32, 32), np.float32)})[0]
        assert logits.shape == (batch, 3)


def test_predict_encoded_images_agrees_with_the_label_most_of_the_time(tl, fp32, manifest):
    samples = manifest.samples("test")
    response = tl.predict("shapes", [png_bytes(p) for p, _ in samples], top_k=3, return_logits=True)
    assert response.model.version == 1 and response.runtime == pb.RUNTIME_ONNX
    assert response.precision == pb.PRECISION_FP32
    assert len(response.predictions) == len(samples)
    first = response.predictions[0]
    assert len(first.top_k) == 3 and len(first.logits) == 3
    assert first.top_k[0].probability >= first.top_k[1].probability >= first.top_k[2].probability
    assert abs(sum(s.probability for s in first.top_k) - 1) < 1e-4
    correct = sum(p.top_k[0].index == label for p, (_, label) in zip(response.predictions, samples))
    # Export measured the same images through torchvision transforms; serving decodes with
    # PIL + numpy: the same classes, give or take one borderline image.
    assert correct / len(samples) == pytest.approx(fp32.test_top1_accuracy, abs=1 / len(samples) + 1e-9)


def test_onnx_and_pytorch_runtimes_give_the_same_logits(tl, fp32, manifest):
    images = [png_bytes(p) for p, _ in manifest.samples("val")[:4]]
    onnx = tl.predict("shapes", images, return_logits=True, return_embeddings=True)
    torch = tl.predict("shapes", images, runtime="pytorch", return_logits=True, return_embeddings=True)
    assert torch.runtime == pb.RUNTIME_PYTORCH
    # On a GPU the PyTorch runtime runs on CUDA, whose convolutions use TF32: about 1e-3 off.
    for a, b in zip(onnx.predictions, torch.predictions):
        np.testing.assert_allclose(a.logits, b.logits, atol=5e-3, rtol=1e-2)
        np.testing.assert_allclose(a.embedding, b.embedding, atol=5e-3, rtol=1e-2)
        assert len(a.embedding) == 512  # resnet18's pooled features


def test_raw_tensors_at_the_input_size_are_taken_as_prepared(tl, fp32, made, manifest):
    _, _, model = made
    path, _ = manifest.samples("test")[0]
    pixels = np.asarray(Image.open(path).convert("RGB"))  # (32, 32, 3): the model's input size
    mean = np.array(model.preprocessing.mean, np.float32)
    std = np.array(model.preprocessing.std, np.float32)
    normalised = ((pixels / np.float32(255) - mean) / std).transpose(2, 0, 1).astype(np.float32)  # (3, 32, 32)
    response = tl.predict("shapes", [
        pb.Tensor(shape=list(pixels.shape), dtype=pb.DATA_TYPE_UINT8, data=pixels.tobytes()),
        pb.Tensor(shape=list(normalised.shape), dtype=pb.DATA_TYPE_FLOAT32, data=normalised.tobytes()),
    ], return_logits=True)
    np.testing.assert_allclose(response.predictions[0].logits, response.predictions[1].logits, atol=1e-4)


def test_raw_tensors_of_another_size_are_preprocessed_like_a_decoded_image(tl, fp32, manifest):
    path, _ = manifest.samples("test")[0]
    image = Image.open(path).convert("RGB").resize((64, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    pixels = np.asarray(image)
    response = tl.predict("shapes", [
        buffer.getvalue(), pb.Tensor(shape=list(pixels.shape), dtype=pb.DATA_TYPE_UINT8, data=pixels.tobytes()),
    ], return_logits=True)
    np.testing.assert_allclose(response.predictions[0].logits, response.predictions[1].logits, atol=1e-4)


def test_bad_images_are_refused_naming_their_index_and_the_server_keeps_serving(tl, fp32, manifest):
    good = png_bytes(manifest.samples("test")[0][0])
    cases = [
        ([good, b"not an image"], grpc.StatusCode.INVALID_ARGUMENT, "images[1]"),
        ([good, good, pb.Tensor(shape=[32, 32], dtype=pb.DATA_TYPE_UINT8, data=bytes(1024))],
         grpc.StatusCode.INVALID_ARGUMENT, "images[2]"),
        ([pb.Tensor(shape=[32, 32, 3], dtype=pb.DATA_TYPE_UINT8, data=bytes(10))],
         grpc.StatusCode.INVALID_ARGUMENT, "images[0]"),
        ([_png(400, 400)], grpc.StatusCode.INVALID_ARGUMENT, str(MAX_PIXELS)),
        ([], grpc.StatusCode.INVALID_ARGUMENT, "images"),
    ]
    for images, code, fragment in cases:
        with pytest.raises(tlclient.TLServeError) as e:
            tl.predict("shapes", images)
        assert e.value.code == code, (images, e.value)
        assert fragment in e.value.message, e.value.message
    assert tl.predict("shapes", [good]).predictions[0].top_k  # still serving


def test_wrong_tensor_dtype_names_the_expected_spec(tl, fp32):
    with pytest.raises(tlclient.TLServeError) as e:
        tl.predict("shapes", [pb.Tensor(shape=[32, 32, 3], dtype=pb.DATA_TYPE_FLOAT32, data=bytes(32 * 32 * 3 * 4))])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "uint8" in e.value.message and "(H, W, 3)" in e.value.message


def test_unknown_model_version_or_bad_fields(tl, fp32):
    for call, code in [
        (lambda: tl.predict("nope", [b"x"]), grpc.StatusCode.NOT_FOUND),
        (lambda: tl.predict(pb.ModelRef(name="shapes", version=9), [b"x"]), grpc.StatusCode.NOT_FOUND),
        (lambda: tl.predict("shapes", [b"x"], top_k=-1), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: tl.export_model("nope"), grpc.StatusCode.NOT_FOUND),
        (lambda: tl.download_model("shapes", "/tmp/never-written.onnx", precision="fp16"), grpc.StatusCode.FAILED_PRECONDITION),
    ]:
        with pytest.raises(tlclient.TLServeError) as e:
            call()
        assert e.value.code == code, e.value


def test_int8_export_serves_and_refuses_embeddings_it_lacks(tl, fp32, manifest):
    int8 = tl.export_model("shapes", precision="int8")
    assert int8.precision == pb.PRECISION_INT8 and not int8.has_embedding
    assert int8.size_bytes < fp32.size_bytes / 2
    images = [png_bytes(p) for p, _ in manifest.samples("test")]
    response = tl.predict("shapes", images, precision="int8")
    assert response.precision == pb.PRECISION_INT8 and len(response.predictions) == len(images)
    with pytest.raises(tlclient.TLServeError) as e:
        tl.predict("shapes", images[:1], precision="int8", return_embeddings=True)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "embedding" in e.value.message


def test_predict_stream_answers_in_order_and_goes_on_after_a_bad_request(tl, fp32, manifest):
    good = png_bytes(manifest.samples("test")[0][0])
    requests = [
        pb.PredictRequest(model=pb.ModelRef(name="shapes"), images=[pb.ImageInput(encoded=good)], request_id=f"r{i}")
        for i in range(6)
    ]
    requests[2].images[0].encoded = b"broken"
    responses = list(tl.predict_stream(requests))
    assert [r.request_id for r in responses] == [f"r{i}" for i in range(6)]
    assert responses[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "images[0]" in responses[2].error.message
    assert all(r.predictions and not r.HasField("error") for i, r in enumerate(responses) if i != 2)


def test_a_message_over_the_receive_limit_names_the_limit_and_the_call(tl, fp32):
    big = pb.PredictRequest(model=pb.ModelRef(name="shapes"), images=[pb.ImageInput(encoded=bytes(MAX_MESSAGE + 1000))])
    with pytest.raises(tlclient.TLServeError) as e:
        list(tl.predict_stream([big]))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "PredictStream" in e.value.message and str(MAX_MESSAGE) in e.value.message
    with pytest.raises(tlclient.TLServeError) as e:
        tl.predict("shapes", [bytes(MAX_MESSAGE + 1000)])
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Predict" in e.value.message


def test_a_message_over_grpcs_own_cap_is_refused_by_grpc_and_the_server_keeps_serving(tl, fp32, manifest):
    # gRPC core reads nothing over CORE_RECEIVE_CAP_FACTOR × the limit: its own refusal, the same code.
    huge = bytes(CORE_RECEIVE_CAP_FACTOR * MAX_MESSAGE + 1000)
    with pytest.raises(tlclient.TLServeError) as e:
        tl.predict("shapes", [huge])
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in e.value.message.lower()
    with pytest.raises(tlclient.TLServeError) as e:
        list(tl.predict_stream([pb.PredictRequest(model=pb.ModelRef(name="shapes"),
                                                  images=[pb.ImageInput(encoded=huge)])]))
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    (path, label), *_ = manifest.samples("test")
    assert tl.predict("shapes", [png_bytes(path)]).predictions[0].top_k  # still serving


def test_concurrent_calls_batch_and_one_bad_call_does_not_fail_the_others(server, fp32, manifest):
    good = png_bytes(manifest.samples("test")[0][0])

    async def run() -> list:
        async with tlclient.AsyncClient(server.address, timeout=60) as c:
            calls = [c.predict("shapes", [good]) for _ in range(15)] + [c.predict("shapes", [b"bad"])]
            return await asyncio.gather(*calls, return_exceptions=True)

    before = batch_size_metric(server)
    results = asyncio.run(run())
    assert all(isinstance(r, pb.PredictResponse) for r in results[:15]), results
    assert isinstance(results[15], tlclient.TLServeError)
    assert results[15].code == grpc.StatusCode.INVALID_ARGUMENT
    # The batch sizes seen are a metric: the 15 good images ran in at most 15 batches;
    # the bad call was refused before it could join one.
    after = batch_size_metric(server)
    images, batches = after[0] - before[0], after[1] - before[1]
    assert images == 15 and 1 <= batches <= 15


def batch_size_metric(server) -> tuple[float, float]:
    """`tlserve_inference_batch_size_images` of model "shapes", every variant: (sum, count)."""
    with urllib.request.urlopen(f"http://{server.metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"tlserve_inference_batch_size_images_{part}{{") and 'model="shapes"' in line:
                values[part] = values.get(part, 0.0) + float(line.rsplit(" ", 1)[1])
    return values.get("sum", 0.0), values.get("count", 0.0)


def test_the_cli_exports_downloads_and_predicts(server, fp32, manifest, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    tlserve = str(Path(sys.executable).with_name("tlserve"))

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([tlserve, "--address", server.address, *args], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    exported = run("export", "shapes", "--precision", "fp16")
    assert "parity" in exported.stdout and "delta vs fp32" in exported.stdout
    target = tmp_path / "fp16.onnx"
    run("download", "shapes", "--precision", "fp16", "-o", str(target))
    assert target.stat().st_size > 0
    (path, label), *_ = manifest.samples("test")
    shown = json.loads(run("predict", "shapes", str(path), "--top-k", "2", "--json").stdout)
    assert len(shown["predictions"]) == 1 and len(shown["predictions"][0]["top_k"]) == 2
    table = run("predict", "shapes", str(path), "--precision", "fp16").stdout
    assert "shapes:1 (onnx, fp16)" in table.lower() and str(path) in table


def test_delete_model_unloads_it_and_predict_then_says_not_found(tl, fp32, manifest, made):
    # Last in the module: the model goes away.
    good = png_bytes(manifest.samples("test")[0][0])
    tl.predict("shapes", [good])
    tl.delete_model("shapes", version=1)
    with pytest.raises(tlclient.TLServeError) as e:
        tl.predict("shapes", [good])
    assert e.value.code == grpc.StatusCode.NOT_FOUND


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()
