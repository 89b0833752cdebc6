"""Unit tests of the client SDK and the `tlserve` CLI: pure logic, no server.

Model-ref and weights parsing, option-name → enum mappings, error conversion,
the retry service config, archive building and upload chunking, download
verification, table and progress rendering, and CLI argument handling.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import zipfile

import grpc
import pytest

import tlserve.client as client
from tlserve.client import AsyncClient, Client, TLServeError, cli, parse_model_ref, pb
from tlserve.client.cli import commands as cli_commands
from tlserve.client.cli import parser as cli_parser
from tlserve.client.cli import render as cli_render
from tlserve.client import _common as c

SERVICE = pb.DESCRIPTOR.services_by_name["TLServe"]


def snake(name: str) -> str:
    return "".join("_" + ch.lower() if ch.isupper() else ch for ch in name).lstrip("_")


# --- package surface --------------------------------------------------------------


def test_package_exports_the_public_api():
    assert {"Client", "AsyncClient", "TLServeError", "pb", "parse_model_ref", "__version__"} <= set(dir(client))
    assert isinstance(client.__version__, str)


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_every_rpc_has_a_sync_and_an_async_method(method):
    name = snake(method.name)
    assert callable(getattr(Client, name))
    async_method = getattr(AsyncClient, name)
    # Server streams come back at once as async iterators; the rest are coroutines
    # (download_model consumes its stream and returns the artifact).
    expect_coroutine = not method.server_streaming or method.name == "DownloadModel"
    assert inspect.iscoroutinefunction(async_method) is expect_coroutine


def test_the_sync_client_is_generated_from_the_async_one():
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "gen_sync_client.py")
    result = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_both_clients_take_the_same_keywords_and_say_the_same():
    public = sorted(n for n in vars(AsyncClient) if not n.startswith("_"))
    assert public == sorted(n for n in vars(Client) if not n.startswith("_"))
    for name in public:
        sync_params = list(inspect.signature(getattr(Client, name)).parameters)
        assert list(inspect.signature(getattr(AsyncClient, name)).parameters) == sync_params, name
        assert getattr(Client, name).__doc__ or not getattr(AsyncClient, name).__doc__, name


def test_client_imports_no_heavy_dependencies():
    import subprocess
    import sys

    code = (
        "import sys, tlserve.client, tlserve.client.cli; "
        "print(sorted(m for m in ('torch','numpy','PIL','prometheus_client','tlserve.service') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- model refs, weights, enums -------------------------------------------------------


@pytest.mark.parametrize(
    "text, name, version",
    [("flowers", "flowers", 0), ("flowers:3", "flowers", 3), ("flowers:latest", "flowers", 0),
     ("my-model_v1.2:10", "my-model_v1.2", 10)],
)
def test_parse_model_ref(text, name, version):
    assert parse_model_ref(text) == pb.ModelRef(name=name, version=version)


@pytest.mark.parametrize("text", ["", ":3", "flowers:", "flowers:x", "flowers:-1", "two words", "a:b:c"])
def test_parse_model_ref_rejects_bad_references(text):
    with pytest.raises(ValueError):
        parse_model_ref(text)


def test_model_ref_accepts_a_message_and_an_explicit_version():
    ref = pb.ModelRef(name="flowers", version=2)
    copy = c.model_ref(ref, version=5)
    assert copy == pb.ModelRef(name="flowers", version=5)
    assert ref.version == 2  # the caller's message is left alone
    assert c.model_ref("flowers:3", version=0).version == 0
    with pytest.raises(ValueError):
        c.model_ref("flowers", version=-1)


@pytest.mark.parametrize(
    "spec, field, value",
    [("DEFAULT", "torchvision", "DEFAULT"),
     ("ResNet18_Weights.IMAGENET1K_V1", "torchvision", "ResNet18_Weights.IMAGENET1K_V1"),
     ("none", "scratch", pb.WeightsSource.Scratch()),
     ("file:weights/r18.pth", "file", "weights/r18.pth"),
     ("model:flowers:2", "model", pb.ModelRef(name="flowers", version=2))],
)
def test_parse_weights(spec, field, value):
    source = c.parse_weights(spec)
    assert source.WhichOneof("source") == field
    assert getattr(source, field) == value


@pytest.mark.parametrize("spec", ["", "file:", "http://x", "model:bad name"])
def test_parse_weights_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        c.parse_weights(spec)


def test_enum_choices_come_from_the_enum_itself():
    assert c.enum_choices(pb.Strategy, "STRATEGY_") == {
        "auto": pb.STRATEGY_AUTO,
        "feature_extraction": pb.STRATEGY_FEATURE_EXTRACTION,
        "partial": pb.STRATEGY_PARTIAL,
        "full": pb.STRATEGY_FULL,
        "progressive_unfreezing": pb.STRATEGY_PROGRESSIVE_UNFREEZING,
        "prototype": pb.STRATEGY_PROTOTYPE,
    }
    assert c.enum_choices(pb.Precision, "PRECISION_") == {"fp32": 1, "fp16": 2, "int8": 3}


def test_enum_value_takes_short_names_full_names_and_numbers():
    assert c.enum_value(pb.Precision, "fp16") == pb.PRECISION_FP16
    assert c.enum_value(pb.Precision, "PRECISION_INT8") == pb.PRECISION_INT8
    assert c.enum_value(pb.Precision, pb.PRECISION_FP32) == pb.PRECISION_FP32
    assert c.enum_value(pb.Precision, None) == pb.PRECISION_UNSPECIFIED
    with pytest.raises(ValueError, match="fp32, fp16, int8"):
        c.enum_value(pb.Precision, "fp64")
    assert c.enum_label(pb.Precision, pb.PRECISION_FP16) == "fp16"
    assert c.enum_label(pb.Precision, 0) == "default"


# --- errors ----------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


def test_rpc_error_becomes_tlserve_error_with_code_message_and_method():
    err = c.error_from_rpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, "model 'x' not found"), "/tlserve.v1.TLServe/GetModel")
    assert isinstance(err, TLServeError)
    assert err.code is grpc.StatusCode.NOT_FOUND
    assert err.message == "model 'x' not found"
    assert err.method == "/tlserve.v1.TLServe/GetModel"
    assert str(err) == "NOT_FOUND: model 'x' not found"


def test_bare_rpc_error_becomes_unknown():
    err = c.error_from_rpc(grpc.RpcError(), "/m")
    assert err.code is grpc.StatusCode.UNKNOWN
    assert str(err).startswith("UNKNOWN: ")


def test_unreachable_server_raises_unavailable_naming_the_method():
    # Port 1 refuses connections: no server needed. Retries take ~0.7 s.
    with Client("127.0.0.1:1", timeout=5) as tl:
        with pytest.raises(TLServeError) as info:
            tl.get_server_info()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert info.value.method == "/tlserve.v1.TLServe/GetServerInfo"


# --- retry policy ------------------------------------------------------------------------


def test_retry_policy_names_exactly_the_read_only_methods():
    config = c.retry_service_config()
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    read_only = {"GetServerInfo", "ListBackbones", "GetDataset", "ListDatasets", "GetJob", "ListJobs",
                 "WatchJob", "ListModels", "GetModel", "DownloadModel", "Predict"}
    assert names == {("tlserve.v1.TLServe", m) for m in read_only} | {("grpc.health.v1.Health", "Check")}
    assert read_only <= set(SERVICE.methods_by_name)  # no typo names a method that does not exist
    for mutating in ("UploadDataset", "FineTune", "CancelJob", "DeleteModel", "ExportModel", "DeleteDataset"):
        assert ("tlserve.v1.TLServe", mutating) not in names
    policy = method_config["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert policy["maxAttempts"] == 4
    assert policy["initialBackoff"].endswith("s") and policy["backoffMultiplier"] > 1


def test_channel_options_enable_retries_with_the_service_config():
    options = dict(c.channel_options(1024))
    assert options["grpc.enable_retries"] == 1
    assert json.loads(options["grpc.service_config"]) == c.retry_service_config()
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 1024


# --- request builders ------------------------------------------------------------------------


def test_fine_tune_keywords_fill_the_request_and_training_options():
    req = c.fine_tune_request(
        dataset="flowers", model_name="fl", backbone="resnet18", weights="model:base:1", strategy="partial",
        trainable_groups=2, epochs=3, batch_size=16, learning_rate=1e-3, optimizer="adamw", seed=7,
        labels={"team": "cv"}, devices=None,
    )
    assert (req.dataset, req.model_name, req.backbone) == ("flowers", "fl", "resnet18")
    assert req.weights.model == pb.ModelRef(name="base", version=1)
    assert req.strategy == pb.STRATEGY_PARTIAL and req.trainable_groups == 2
    assert req.training.epochs == 3 and req.training.batch_size == 16
    assert req.training.learning_rate == pytest.approx(1e-3)
    assert req.training.optimizer == pb.OPTIMIZER_ADAMW
    assert not req.training.HasField("momentum")  # unset optionals stay unset: server defaults
    assert not req.training.HasField("early_stopping")
    assert req.seed == 7 and dict(req.labels) == {"team": "cv"}


def test_fine_tune_patience_zero_turns_early_stopping_off_rather_than_leaving_the_default():
    req = c.fine_tune_request(dataset="d", model_name="m", backbone="b", patience=0)
    assert req.training.HasField("early_stopping") and req.training.early_stopping.patience == 0
    from tlserve.service.training.config import TrainConfig

    config = TrainConfig.from_request(req, num_classes=2, train_images_per_class=10, device_type="cpu")
    assert config.patience == 0


def test_fine_tune_takes_a_request_or_keywords_not_both():
    full = pb.FineTuneRequest(dataset="d", model_name="m", backbone="b")
    assert c.fine_tune_request(full, dataset=None) is full
    with pytest.raises(TypeError, match="not both"):
        c.fine_tune_request(full, epochs=3)
    with pytest.raises(TypeError, match="backbone"):
        c.fine_tune_request(dataset="d", model_name="m")


def test_predict_request_wraps_encoded_bytes():
    req = c.predict_request("flowers:2", [b"\xff\xd8jpeg"], top_k=3, precision="fp16", runtime="onnx")
    assert req.model == pb.ModelRef(name="flowers", version=2)
    assert req.images[0].encoded == b"\xff\xd8jpeg"
    assert (req.top_k, req.precision, req.runtime) == (3, pb.PRECISION_FP16, pb.RUNTIME_ONNX)
    with pytest.raises(TypeError):
        c.predict_request("flowers", ["rose.jpg"])


# --- archives and upload ---------------------------------------------------------------------


def make_dataset(root):
    for rel, data in {"roses/b.jpg": b"B" * 10, "roses/a.jpg": b"A" * 10, "tulips/c.png": b"C" * 5,
                      "labels.txt": b"roses\ntulips\n"}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_directory_zip_has_sorted_relative_paths_and_skips_symlinks(tmp_path):
    root = make_dataset(tmp_path / "ds")
    os.symlink("/etc/passwd", root / "roses" / "link.jpg")
    os.symlink(tmp_path, root / "loop")
    dest = tmp_path / "out.zip"
    assert c.zip_directory(str(root), str(dest)) == 4
    with zipfile.ZipFile(dest) as zf:
        assert zf.namelist() == ["labels.txt", "roses/a.jpg", "roses/b.jpg", "tulips/c.png"]
        assert zf.read("roses/a.jpg") == b"A" * 10


def test_directory_zip_is_deterministic(tmp_path):
    root = make_dataset(tmp_path / "ds")
    c.zip_directory(str(root), str(tmp_path / "1.zip"))
    os.utime(root / "labels.txt", (0, 0))  # a changed mtime must not change the archive
    c.zip_directory(str(root), str(tmp_path / "2.zip"))
    assert (tmp_path / "1.zip").read_bytes() == (tmp_path / "2.zip").read_bytes()


def test_empty_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        c.prepare_archive(tmp_path / "empty")


@pytest.mark.parametrize(
    "name, fmt",
    [("d.zip", pb.ARCHIVE_FORMAT_ZIP), ("d.tar", pb.ARCHIVE_FORMAT_TAR), ("d.TAR.GZ", pb.ARCHIVE_FORMAT_TAR_GZ),
     ("d.tgz", pb.ARCHIVE_FORMAT_TAR_GZ)],
)
def test_archive_format_from_suffix(name, fmt):
    assert c.archive_format(name) == fmt


def test_unknown_archive_suffix_is_refused(tmp_path):
    path = tmp_path / "d.rar"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=".zip"):
        c.prepare_archive(path)


def test_upload_stream_is_metadata_then_chunks_with_progress(tmp_path):
    archive = c.prepare_archive(make_dataset(tmp_path / "ds"))
    try:
        assert archive.temporary and os.path.exists(archive.path)
        calls = []
        split = pb.SplitOptions(val_fraction=0.2, seed=3)
        messages = list(c.upload_requests(archive, "flowers", split, chunk_size=100,
                                          progress=lambda d, t: calls.append((d, t))))
        data = open(archive.path, "rb").read()
    finally:
        archive.cleanup()
    assert not os.path.exists(archive.path)
    meta = messages[0].metadata
    assert (meta.name, meta.format, meta.size_bytes) == ("flowers", pb.ARCHIVE_FORMAT_ZIP, len(data))
    assert meta.sha256 == hashlib.sha256(data).hexdigest()
    assert meta.split == split
    chunks = [m.chunk for m in messages[1:]]
    assert b"".join(chunks) == data and max(len(x) for x in chunks) == 100
    assert calls[0] == (0, len(data)) and calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_archive_file_is_streamed_as_is_and_kept(tmp_path):
    path = tmp_path / "d.tar"
    path.write_bytes(b"t" * 50)
    archive = c.prepare_archive(path)
    archive.cleanup()
    assert path.exists() and not archive.temporary
    assert archive.sha256 == hashlib.sha256(b"t" * 50).hexdigest()


# --- download ------------------------------------------------------------------------------------


def download_stream(data: bytes, sha256: str | None = None, size: int | None = None):
    artifact = pb.ModelArtifact(size_bytes=len(data) if size is None else size,
                                sha256=sha256 or hashlib.sha256(data).hexdigest())
    yield pb.DownloadModelResponse(artifact=artifact)
    for i in range(0, len(data), 4):
        yield pb.DownloadModelResponse(chunk=data[i:i + 4])


def receive(dest, responses):
    receiver = c.ArtifactReceiver(dest, "/tlserve.v1.TLServe/DownloadModel")
    try:
        for r in responses:
            receiver.feed(r)
        return receiver.finish()
    except BaseException:
        receiver.abort()
        raise


def test_download_is_verified_and_renamed_into_place(tmp_path):
    dest = tmp_path / "m.onnx"
    artifact = receive(dest, download_stream(b"onnx-bytes-here"))
    assert dest.read_bytes() == b"onnx-bytes-here"
    assert artifact.size_bytes == 15
    assert os.listdir(tmp_path) == ["m.onnx"]


@pytest.mark.parametrize(
    "stream",
    [download_stream(b"abcdefgh", sha256="0" * 64), download_stream(b"abcdefgh", size=20),
     download_stream(b"abcdefgh", size=3), iter([pb.DownloadModelResponse(chunk=b"x")]), iter([])],
    ids=["bad-sha256", "short", "long", "no-metadata", "empty"],
)
def test_bad_download_raises_data_loss_and_leaves_nothing(tmp_path, stream):
    with pytest.raises(TLServeError) as info:
        receive(tmp_path / "m.onnx", stream)
    assert info.value.code is grpc.StatusCode.DATA_LOSS
    assert os.listdir(tmp_path) == []


# --- rendering ------------------------------------------------------------------------------------


def test_human_readable_numbers():
    assert cli_render.human_bytes(46_830_571) == "44.7 MB"  # resnet18's weights file
    assert cli_render.human_bytes(512) == "512 B"
    assert cli_render.human_bytes(3 * 1024**3) == "3.0 GB"
    assert cli_render.percent(0.69758) == "69.76%"
    assert cli_render.gflops(1.814) == "1.81"
    assert cli_render.millions(11_689_512) == "11.7"
    assert cli_render.duration(200) == "3m20s" and cli_render.duration(3720) == "1h02m" and cli_render.duration(5) == "5s"


def test_table_right_aligns_numeric_columns():
    text = cli_render.render_table(
        ["name", "params (M)", "top-1", "file size", "cached"],
        [["resnet18", "11.7", "69.76%", "44.7 MB", "no"], ["resnet152", "60.2", "82.28%", "230.5 MB", "yes"]],
    )
    assert text.splitlines() == [
        "name       params (M)   top-1  file size  cached",
        "resnet18         11.7  69.76%    44.7 MB  no",
        "resnet152        60.2  82.28%   230.5 MB  yes",
    ]


def test_table_with_no_rows_is_the_header():
    assert cli_render.render_table(["a", "bb"], []) == "a  bb"


def test_progress_on_a_pipe_prints_a_line_per_tenth():
    out = io.StringIO()
    bar = cli_render.Progress(out, tty=False, width=10)
    for done in range(0, 101):
        bar.update(done, 100, label="dl")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in out.getvalue()
    assert lines[0] == "dl [----------]   0% 0/100"
    assert lines[-1] == "dl [##########] 100% 100/100"


def test_progress_on_a_terminal_redraws_in_place_and_throttles():
    out = io.StringIO()
    now = [0.0]
    bar = cli_render.Progress(out, tty=True, width=4, min_interval=1.0, clock=lambda: now[0])
    bar.update(1, 4, label="x")
    bar.update(2, 4, label="x")  # within min_interval: skipped
    now[0] = 2.0
    bar.update(3, 4, label="x", detail="loss 0.1")
    bar.update(4, 4, label="x")  # completion is always drawn
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    assert " 50%" not in text and "loss 0.1" in text


def test_progress_without_total_shows_the_count():
    assert cli_render.render_progress(1234, 0, label="up", fmt=cli_render.human_bytes) == "up 1.2 KB"


# --- CLI --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["bogus"], ["finetune", "--dataset", "d", "--model-name", "m"],
     ["finetune", "--dataset", "d", "--model-name", "m", "--backbone", "b", "--strategy", "magic"],
     ["finetune", "--dataset", "d", "--model-name", "m", "--backbone", "b", "--weights", "ftp:x"],
     ["models", "show", "bad name"], ["export", "m", "--precision", "fp64"], ["download", "m"],
     ["predict", "m"], ["--timeout", "soon", "info"]],
)
def test_bad_usage_exits_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage:" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "finetune" in capsys.readouterr().out


def test_global_options_work_before_and_after_the_subcommand(monkeypatch):
    monkeypatch.setenv("TLSERVE_ADDRESS", "envhost:1")
    parser = cli_parser.build_parser()
    args = parser.parse_args(["--address", "a:1", "--json", "models", "show", "m:2"])
    assert (args.address, args.json, args.model) == ("a:1", True, pb.ModelRef(name="m", version=2))
    args = parser.parse_args(["datasets", "upload", "d.zip", "--name", "n", "--address", "b:2", "--timeout", "3"])
    assert (args.address, args.timeout, args.func) == ("b:2", 3.0, cli_commands.cmd_datasets_upload)
    args = parser.parse_args(["datasets"])
    assert (args.address, args.func) == ("envhost:1", cli_commands.cmd_datasets_list)


def test_serve_and_token_pass_the_rest_of_the_line_through():
    assert cli._split_passthrough(["--address", "x:1", "serve", "--grpc-address", "0:0", "--help"]) == (
        "serve", ["--grpc-address", "0:0", "--help"])
    assert cli._split_passthrough(["--token", "serve", "token", "--help"]) == ("token", ["--help"])
    assert cli._split_passthrough(["--json", "models"]) is None


def test_serve_without_the_server_says_to_install_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tlserve.service.__main__", None)  # import fails
    assert cli.main(["serve", "--grpc-address", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert "tlserve[server]" in err and len(err.strip().splitlines()) == 1


class FailingClient:
    """Stands in for Client: every call fails the way a server would."""

    def __init__(self, address, **kw):
        self.address = address

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def __getattr__(self, name):
        def fail(*args, **kw):
            raise TLServeError(grpc.StatusCode.UNIMPLEMENTED, "ListModels is not available\nyet", "/m")
        return fail


def test_server_error_is_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(cli, "Client", FailingClient)
    assert cli.main(["models"]) == 1
    assert capsys.readouterr().err == "tlserve: error: UNIMPLEMENTED: ListModels is not available yet\n"


def test_unavailable_error_names_the_address():
    err = TLServeError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", "/m")
    assert cli.error_line(err, "10.0.0.1:50051") == (
        "tlserve: error: UNAVAILABLE: cannot reach a tlserve server at 10.0.0.1:50051: "
        "failed to connect to all addresses"
    )


def test_unreadable_image_is_one_line_and_exit_1(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "Client", FailingClient)
    assert cli.main(["predict", "m", str(tmp_path / "missing.jpg")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tlserve: error: ") and len(err.splitlines()) == 1
