"""The error → status table and the observing interceptor, over a real port.

A tiny generic service raises each domain error; the test calls it through a
real channel, because in-process fakes skip interceptors.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from prometheus_client import CollectorRegistry

from tlserve.service import errors
from tlserve.service.logs import RequestIdFilter
from tlserve.service.api.interceptors import STATUS_BY_ERROR, ErrorInterceptor, ObserveInterceptor
from tlserve.service.metrics import GrpcMetrics

SERVICE = "test.Echo"


def _identity(b: bytes) -> bytes:
    return b


async def _raise(request: bytes, context) -> bytes:
    kind = request.decode()
    if kind == "ok":
        return b"fine"
    if kind == "bug":
        raise ZeroDivisionError("secret internals")
    raise getattr(errors, kind)(f"{kind} happened: fix the field")


async def _stream(request: bytes, context):
    yield b"one"
    raise errors.ResourceExhausted("queue full")


def _run(calls, *, registry: CollectorRegistry):
    """Starts a server with the real interceptors, runs `calls(channel)`, returns its result."""

    async def main():
        metrics = GrpcMetrics.create(registry)
        server = grpc.aio.server(interceptors=[ObserveInterceptor(metrics), ErrorInterceptor()])
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(_raise, _identity, _identity),
                "Stream": grpc.unary_stream_rpc_method_handler(_stream, _identity, _identity),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await calls(channel)
        finally:
            await server.stop(None)

    return asyncio.run(main())


async def _call(channel, kind: str, metadata=()):
    unary = channel.unary_unary(f"/{SERVICE}/Unary", _identity, _identity)
    call = unary(kind.encode(), metadata=metadata, timeout=10)
    try:
        await call
    except grpc.aio.AioRpcError:
        pass
    return await call.code(), await call.details(), dict(await call.trailing_metadata())


@pytest.mark.parametrize("error", sorted(STATUS_BY_ERROR, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_each_domain_error_maps_to_its_status_with_its_message(error):
    code, details, _ = _run(lambda ch: _call(ch, error.__name__), registry=CollectorRegistry())
    assert code == STATUS_BY_ERROR[error]
    assert details == f"{error.__name__} happened: fix the field"


def test_subclasses_inherit_their_base_status():
    from tlserve.service.backbones import UnknownBackbone, WeightsNotCached
    from tlserve.service.api.interceptors import status_for

    assert status_for(UnknownBackbone("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(WeightsNotCached("x")) == grpc.StatusCode.FAILED_PRECONDITION


def test_a_bug_is_internal_with_a_request_id_and_no_internals(caplog):
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.ERROR, logger="tlserve.rpc"):
        code, details, trailers = _run(lambda ch: _call(ch, "bug"), registry=CollectorRegistry())
    assert code == grpc.StatusCode.INTERNAL
    assert "secret internals" not in details and "Traceback" not in details
    request_id = trailers["x-request-id"]
    assert f"request id {request_id}" in details
    # The traceback is in the log, under the same request id.
    record = next(r for r in caplog.records if r.exc_info)
    assert record.exc_info[0] is ZeroDivisionError
    assert record.request_id == request_id


def test_metrics_count_final_codes_and_in_flight_returns_to_zero():
    registry = CollectorRegistry()

    async def calls(channel):
        for kind in ("ok", "ok", "NotFound", "bug"):
            await _call(channel, kind)
        stream = channel.unary_stream(f"/{SERVICE}/Stream", _identity, _identity)(b"", timeout=10)
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for item in stream:
                received.append(item)
        assert received == [b"one"] and e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    _run(calls, registry=registry)
    value = registry.get_sample_value
    unary = f"{SERVICE}/Unary"
    assert value("tlserve_grpc_requests_total", {"method": unary, "code": "OK"}) == 2
    assert value("tlserve_grpc_requests_total", {"method": unary, "code": "NOT_FOUND"}) == 1
    assert value("tlserve_grpc_requests_total", {"method": unary, "code": "INTERNAL"}) == 1
    assert value("tlserve_grpc_requests_total", {"method": f"{SERVICE}/Stream", "code": "RESOURCE_EXHAUSTED"}) == 1
    assert value("tlserve_grpc_request_duration_seconds_count", {"method": unary}) == 4
    assert value("tlserve_grpc_requests_in_flight", {"method": unary}) == 0


@pytest.mark.parametrize(
    ("given", "echoed"),
    [("req-42", True), ("x" * 65, False), ("has space", False), ("", False)],
)
def test_request_id_from_the_caller_is_echoed_only_when_plain(given, echoed):
    metadata = (("x-request-id", given),) if given else ()
    _, _, trailers = _run(lambda ch: _call(ch, "ok", metadata), registry=CollectorRegistry())
    assert (trailers["x-request-id"] == given) is echoed
    assert 1 <= len(trailers["x-request-id"]) <= 64


def test_a_full_disk_or_a_missing_permission_is_said_so_and_other_os_errors_stay_internal():
    import errno as errnos

    from tlserve.service.api.interceptors import _environment_status

    code, message = _environment_status(OSError(errnos.ENOSPC, "No space left on device"), "tlserve.v1.TLServe/ExportModel")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and message.startswith("ExportModel: the server's disk is full")
    code, message = _environment_status(PermissionError(errnos.EACCES, "Permission denied"), "x.Y/Z")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "permissions of its home" in message
    assert _environment_status(OSError(errnos.EIO, "Input/output error"), "x.Y/Z")[0] is None
