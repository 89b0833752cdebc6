"""The `tlserve` command line and the Python client against a live server, as a user runs them."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import grpc
import pytest

import tlserve.client as tlclient

TLSERVE = str(pathlib.Path(sys.executable).with_name("tlserve"))


def tlserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([TLSERVE, *args], capture_output=True, text=True, timeout=timeout)


def test_health_prints_serving(live_server):
    result = tlserve("--address", live_server.address, "health")
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_backbones_prints_a_table_with_torchvision_figures(live_server):
    result = tlserve("--address", live_server.address, "backbones", "--family", "resnet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].lower()
    for column in ("name", "family", "params", "gflops", "top-1", "cached"):
        assert column in header
    rows = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith("weights cache:")}
    assert set(rows) == {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
    assert "11.7" in rows["resnet18"]  # 11,689,512 parameters
    assert "1.81" in rows["resnet18"]  # GFLOPs
    assert lines[-1].startswith("weights cache: ") and lines[-1].endswith("weights")


def test_backbones_json_is_machine_readable(live_server):
    result = tlserve("--address", live_server.address, "--json", "backbones", "--family", "vit")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    names = sorted(b["name"] for b in document["backbones"])
    assert names == ["vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"]


def test_info_names_the_devices(live_server):
    result = tlserve("--address", live_server.address, "info")
    assert result.returncode == 0, result.stderr
    assert "cpu" in result.stdout and "2.14" in result.stdout


def test_report_of_an_unknown_model_is_one_line_naming_it(live_server, tmp_path):
    result = tlserve("--address", live_server.address, "report", "nosuch", "--out", str(tmp_path / "r"))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("tlserve: error: NOT_FOUND: ") and "nosuch" in lines[0]
    assert not (tmp_path / "r").exists()


def test_unreachable_server_is_one_line_naming_the_address():
    result = tlserve("--address", "127.0.0.1:1", "--timeout", "3", "backbones")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "UNAVAILABLE" in lines[0] and "127.0.0.1:1" in lines[0]


def test_unknown_backbone_family_is_invalid_argument_listing_families(client):
    with pytest.raises(tlclient.TLServeError) as e:
        client.list_backbones(family="resnt")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "resnet" in e.value.message


def test_client_returns_proto_messages_and_raises_one_error_type(client):
    assert client.health() == "SERVING"
    response = client.list_backbones(family="mobilenet_v3")
    assert isinstance(response, tlclient.pb.ListBackbonesResponse)
    with pytest.raises(tlclient.TLServeError) as e:
        client.get_model("flowers:2")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert str(e.value).startswith("NOT_FOUND: model 'flowers' version 2 does not exist")


def test_async_client_works_the_same(live_server):
    import asyncio

    async def main():
        async with tlclient.AsyncClient(live_server.address) as c:
            info = await c.get_server_info()
            backbones = await c.list_backbones(family="squeezenet")
            return info, backbones

    info, backbones = asyncio.run(main())
    assert info.devices[0].name == "cpu"
    assert [b.name for b in backbones.backbones] == ["squeezenet1_0", "squeezenet1_1"]


def test_async_client_uploads_trains_watches_downloads_and_streams_predictions(live_server, tmp_path):
    # The async client is the source the sync one is generated from: every kind of
    # call it makes (client stream, server stream, unary, a stream consumed into a
    # file, an async request iterator) once, end to end.
    import asyncio

    from tlserve.client import pb
    from tlserve.service.training.synthetic import TARGET_SHAPES, write_image_folder

    folder = write_image_folder(tmp_path / "shapes", TARGET_SHAPES[:2], 6, size=32, seed=6)
    image = next(folder.glob("*/*.png")).read_bytes()

    async def main():
        async with tlclient.AsyncClient(live_server.address, timeout=60) as c:
            dataset = await c.upload_dataset(folder, "aio-shapes")
            job = await c.fine_tune(dataset=dataset.id, model_name="aio-model", backbone="mobilenet_v3_small",
                                    weights="none", strategy="feature_extraction", epochs=1, image_size=32)
            states = [event.state async for event in c.watch_job(job.id)]
            model = (await c.get_job(job.id)).model
            artifact = await c.download_model(model.name, tmp_path / "aio.pt", version=model.version, format="pytorch")

            async def requests():
                for request_id in ("a", "b"):
                    yield pb.PredictRequest(model=model, images=[pb.ImageInput(encoded=image)], request_id=request_id)

            answers = [r.request_id async for r in c.predict_stream(requests())]
            with pytest.raises(tlclient.TLServeError) as missing:
                await c.get_model("aio-no-such-model")
            return dataset, states, artifact, answers, missing.value

    dataset, states, artifact, answers, missing = asyncio.run(main())
    assert dataset.name == "aio-shapes" and dataset.image_count == 12
    assert states[-1] == pb.JOB_STATE_SUCCEEDED
    assert (tmp_path / "aio.pt").stat().st_size == artifact.size_bytes > 0
    assert answers == ["a", "b"]
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_serve_help_lists_every_setting():
    result = tlserve("serve", "--help")
    assert result.returncode == 0
    for flag in ("--home", "--grpc-address", "--metrics-address", "TLSERVE_HOME"):
        assert flag in result.stdout


def test_upload_finetune_watch_and_list_from_the_command_line(live_server, tmp_path):
    from tlserve.service.training.synthetic import TARGET_SHAPES, write_image_folder

    folder = write_image_folder(tmp_path / "shapes", TARGET_SHAPES[:2], 6, size=32, seed=5)
    address = ("--address", live_server.address)
    upload = tlserve(*address, "datasets", "upload", str(folder), "--name", "cli-shapes")
    assert upload.returncode == 0, upload.stderr
    assert "cli-shapes" in upload.stdout
    run = tlserve(
        *address, "finetune", "--dataset", "cli-shapes", "--model-name", "cli-model", "--backbone",
        "mobilenet_v3_small", "--weights", "none", "--strategy", "feature_extraction", "--epochs", "1",
        "--image-size", "32", "--patience", "0", "--watch", timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "SUCCEEDED" in run.stdout + run.stderr
    models = tlserve(*address, "--json", "models")
    assert models.returncode == 0, models.stderr
    (model,) = [m for m in json.loads(models.stdout)["models"] if m["name"] == "cli-model"]
    assert model["backbone"] == "mobilenet_v3_small" and model["version"] == 1
    jobs = tlserve(*address, "jobs")
    assert jobs.returncode == 0 and "SUCCEEDED" in jobs.stdout.upper()
    listed = tlserve(*address, "--json", "jobs")
    (job,) = [j for j in json.loads(listed.stdout)["jobs"] if j["request"]["model_name"] == "cli-model"]
    assert job["request"]["training"]["early_stopping"]["patience"] == 0  # set, to 0: every epoch runs
