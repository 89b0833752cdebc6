"""The generated modules are fresh, importable as a package, and the API follows its conventions."""

from __future__ import annotations

import filecmp
import pathlib
import subprocess
import sys

import pytest

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_checked_in_modules_match_a_fresh_generation(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    checked_in = sorted(
        p.relative_to(ROOT)
        for p in (ROOT / "client").rglob("*")
        if p.is_file() and p.suffix in {".py", ".pyi"} and p.relative_to(ROOT / "client").parts[0] in {"tlserve", "inference"}
    )
    assert fresh == checked_in, "run `make protos` and commit the result"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, ROOT / p, shallow=False)]
    assert not stale, f"stale generated modules (run `make protos`): {stale}"


def test_generated_modules_import_without_path_tricks():
    code = "from tlserve.client.tlserve.v1 import tlserve_pb2, tlserve_pb2_grpc; print(tlserve_pb2_grpc.TLServeStub.__name__)"
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "TLServeStub"


def _enums():
    yield from pb.DESCRIPTOR.enum_types_by_name.values()
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        yield from message.enum_types


@pytest.mark.parametrize("enum", list(_enums()), ids=lambda e: e.full_name)
def test_every_enum_starts_with_an_unspecified_zero(enum):
    assert enum.values[0].number == 0
    assert enum.values[0].name.endswith("UNSPECIFIED")


def test_the_api_has_the_rpcs_clients_rely_on():
    methods = set(pb.DESCRIPTOR.services_by_name["TLServe"].methods_by_name)
    assert {
        "FineTune", "GetJob", "ListJobs", "CancelJob", "WatchJob", "UploadDataset", "ListDatasets",
        "ExportModel", "DownloadModel", "Predict", "PredictStream", "ListModels", "GetModel",
        "DeleteModel", "ListBackbones", "ProfileModel",
    } <= methods


def test_streaming_shapes():
    methods = pb.DESCRIPTOR.services_by_name["TLServe"].methods_by_name
    shape = {name: (m.client_streaming, m.server_streaming) for name, m in methods.items()}
    assert shape["UploadDataset"] == (True, False)
    assert shape["WatchJob"] == (False, True)
    assert shape["DownloadModel"] == (False, True)
    assert shape["PredictStream"] == (True, True)
