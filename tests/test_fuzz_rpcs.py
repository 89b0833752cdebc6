"""Every RPC of both services driven with generated messages (hypothesis), against a
real server holding a dataset and a model: extreme numbers, NaN, empty, unicode and
path-like strings, unknown enum values, large repeated fields, random bytes where
images go. Whatever comes in, the answer is a status a caller can act on, never
UNKNOWN or INTERNAL; the server answers health afterwards; and nothing it stored
before is changed or lost.

Runs derandomized (the same examples on every run, so CI is repeatable);
TLSERVE_FUZZ_EXAMPLES=500 explores further with fresh randomness.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tlserve.client.inference import grpc_service_pb2 as kpb
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tests.modelfactory import published_model
from tests.serverproc import ServerProcess

EXAMPLES = int(os.environ.get("TLSERVE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 12, derandomize=not EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Codes that mean "the server broke", not "your request was wrong".
BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

# Real names only where a call cannot change or start anything heavy with them:
# elsewhere (FineTune, Delete*, Export, Profile, Compare) a generated request on
# the real model would be a legitimate change, or minutes of work.
REAL_NAMES = ("shapes", "shapes:1")
READS_WITH_REAL_NAMES = {"GetModel", "ListModels", "GetDataset", "ListDatasets", "Predict", "PredictStream",
                         "ModelMetadata", "ModelReady", "ModelInfer", "ModelConfig", "ModelStatistics", "GetJob",
                         "WatchJob", "ListJobs"}


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, "PNG")
    return buffer.getvalue()


NASTY_STRINGS = ["", " ", ".", "..", "../../etc/passwd", "/etc/passwd", "a" * 300, "\x00", "名前", "🙂",
                 "ds-00000000", "resnet18", "x:0", "x:-1", "x:99999999999", "file:/etc/passwd", "model:", "\n"]
NASTY_BYTES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP", _png(8, 8), _png(1, 2000),
               _png(40, 40)[:60], b"PK\x03\x04" + b"\x00" * 40, b"\x00" * 1000]
INT32 = [0, 1, -1, 2, 7, 2**31 - 1, -(2**31)]
INT64 = [*INT32, 2**63 - 1, -(2**63)]


def scalar(field: FieldDescriptor, names: tuple[str, ...]) -> st.SearchStrategy:
    t = field.type
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.sampled_from(INT32) | st.integers(-(2**31), 2**31 - 1)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.sampled_from(INT64) | st.integers(-(2**63), 2**63 - 1)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.sampled_from([0, 1, 2**32 - 1]) | st.integers(0, 2**32 - 1)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.sampled_from([0, 1, 2**64 - 1]) | st.integers(0, 2**64 - 1)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.sampled_from([*NASTY_STRINGS, *names]) | st.text(max_size=40)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.sampled_from(NASTY_BYTES) | st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.sampled_from(values) | st.integers(-3, 1000)  # proto3 enums are open: unknown values arrive
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


def message(descriptor, names: tuple[str, ...], depth: int = 0) -> st.SearchStrategy:
    """Messages of `descriptor`'s type, each field set or not; nested to depth 3."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    optional = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            value_s = (message(value.message_type, names, depth + 1) if value.message_type else scalar(value, names))
            optional[field.name] = st.dictionaries(scalar(key, names), value_s, max_size=5)
            continue
        one = message(field.message_type, names, depth + 1) if field.message_type else scalar(field, names)
        # Large repeated fields: a long run of one value costs nothing to generate.
        optional[field.name] = (st.lists(one, max_size=5) | st.builds(lambda v, n: [v] * n, one, st.integers(0, 300))
                                if field.is_repeated else one)
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(cls, descriptor, values))


def _build(cls, descriptor, values: dict):
    built = cls()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(built, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if field.message_type.fields_by_name["value"].message_type is not None:
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.is_repeated:
            if field.message_type is not None:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(built, name, value)
    return built


def methods() -> list:
    found = []
    for file, service in ((pb.DESCRIPTOR, "TLServe"), (kpb.DESCRIPTOR, "GRPCInferenceService")):
        for method in file.services_by_name[service].methods:
            found.append(pytest.param(method, id=method.name))
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz") / "home"
    published_model(home, images_per_class=6, epochs=1)
    proc = ServerProcess(home, "--data-root", str(home / "data"), "--max-upload-bytes", str(1 << 20)).start()
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def stored(server, channel) -> dict:
    """What the server holds: its records and the bytes of every artifact and dataset file."""
    ls = lambda name, req, resp: channel.unary_unary(  # noqa: E731
        f"/tlserve.v1.TLServe/{name}", req.SerializeToString, resp.FromString)(req, timeout=30)
    records = {
        "datasets": [d.SerializeToString(deterministic=True)
                     for d in ls("ListDatasets", pb.ListDatasetsRequest(page_size=100), pb.ListDatasetsResponse).datasets],
        "models": sorted((m.name, m.version, tuple(sorted(a.sha256 for a in m.artifacts)))
                         for m in ls("ListModels", pb.ListModelsRequest(page_size=100), pb.ListModelsResponse).models),
    }
    home = pathlib.Path(server.home)
    files = {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
             for sub in ("artifacts", "datasets") for p in sorted((home / sub).rglob("*")) if p.is_file()}
    return {"records": records, "files": files}


def call(channel, method, requests: list):
    service = method.containing_service.full_name
    path = f"/{service}/{method.name}"
    serialize = lambda m: m.SerializeToString()  # noqa: E731
    parse = message_factory.GetMessageClass(method.output_type).FromString
    if method.client_streaming and method.server_streaming:
        responses = channel.stream_stream(path, serialize, parse)(iter(requests), timeout=20)
        return [r for _, r in zip(range(50), responses)]
    if method.client_streaming:
        return channel.stream_unary(path, serialize, parse)(iter(requests), timeout=20)
    if method.server_streaming:
        responses = channel.unary_stream(path, serialize, parse)(requests[0], timeout=5)
        try:
            return [r for _, r in zip(range(5), responses)]
        finally:
            responses.cancel()
    return channel.unary_unary(path, serialize, parse)(requests[0], timeout=20)


@pytest.mark.parametrize("method", methods())
def test_generated_requests_get_a_deliberate_status_and_change_nothing_stored(server, channel, method):
    names = REAL_NAMES if method.name in READS_WITH_REAL_NAMES else ()
    requests = st.lists(message(method.input_type, names), min_size=1, max_size=3 if method.client_streaming else 1)
    before = stored(server, channel)
    seen: dict[str, int] = {}

    @FUZZ
    @given(requests)
    def one(requests):
        try:
            call(channel, method, requests)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert code not in BROKEN, f"{method.name} answered {code.name}: {e.details()} for {requests}"
        seen[code.name] = seen.get(code.name, 0) + 1

    one()
    after = stored(server, channel)
    # Additions are allowed (a generated upload may be a valid dataset); losses are not.
    lost = set(before["records"]["datasets"]) - set(after["records"]["datasets"])
    assert not lost, f"{method.name} changed or lost a dataset record"
    models_after = {(name, version): set(shas) for name, version, shas in after["records"]["models"]}
    for name, version, shas in before["records"]["models"]:
        assert set(shas) <= models_after.get((name, version), set()), f"{method.name} lost {name}:{version}'s files"
    changed = {path for path, digest in before["files"].items() if after["files"].get(path) != digest}
    assert not changed, f"{method.name} changed or removed {sorted(changed)[:5]}"
    health = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
    assert health == b"\x08\x01", "the server no longer answers SERVING"  # HealthCheckResponse(status=SERVING)
    assert sum(seen.values()) >= 1
