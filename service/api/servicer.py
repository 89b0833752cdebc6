"""The tlserve.v1.TLServe servicer.

Each method validates its request, makes one call into the domain and converts
the result back; domain errors propagate and `ErrorInterceptor` turns them into
status codes. Blocking work runs in the default executor (sized from config),
never on the event loop.

RPCs that a later part of tlserve provides answer UNIMPLEMENTED with a message
that says which part is missing (`_NOT_YET_BUILT`), never a fake success.
"""

from __future__ import annotations

import asyncio
import dataclasses

from google.protobuf import timestamp_pb2

from client.tlserve.v1 import tlserve_pb2 as pb
from client.tlserve.v1 import tlserve_pb2_grpc
from service import backbones, hardware
from service.config import Settings
from service.errors import Unimplemented

# RPC → the part of tlserve that will provide it.
_NOT_YET_BUILT: dict[str, str] = {
    "UploadDataset": "dataset ingestion",
    "RegisterDataset": "dataset ingestion",
    "GetDataset": "dataset ingestion",
    "ListDatasets": "dataset ingestion",
    "DeleteDataset": "dataset ingestion",
    "FineTune": "the fine-tuning engine and job queue",
    "GetJob": "the fine-tuning engine and job queue",
    "ListJobs": "the fine-tuning engine and job queue",
    "CancelJob": "the fine-tuning engine and job queue",
    "WatchJob": "the fine-tuning engine and job queue",
    "ListModels": "the model registry (models are published by fine-tuning jobs)",
    "GetModel": "the model registry (models are published by fine-tuning jobs)",
    "DeleteModel": "the model registry (models are published by fine-tuning jobs)",
    "ExportModel": "ONNX export",
    "DownloadModel": "ONNX export",
    "ProfileModel": "model profiling and the trade-off report",
    "CompareBackbones": "model profiling and the trade-off report",
    "Predict": "ONNX Runtime inference",
    "PredictStream": "ONNX Runtime inference",
}


def _not_yet_built(method: str, part: str):
    async def handler(self, request, context):
        raise Unimplemented(f"{method} is not available in this tlserve server yet: {part} is not built")

    handler.__name__ = method
    handler.__doc__ = f"Not built yet: {part}."
    return handler


@dataclasses.dataclass(frozen=True)
class ServerState:
    settings: Settings
    start_time: timestamp_pb2.Timestamp


class TLServeServicer(tlserve_pb2_grpc.TLServeServicer):
    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context) -> pb.ServerInfo:
        versions = hardware.versions()
        return pb.ServerInfo(
            version=versions["tlserve"],
            torch_version=versions["torch"],
            torchvision_version=versions["torchvision"],
            onnxruntime_version=versions["onnxruntime"],
            devices=[
                pb.Device(name=d.name, description=d.description, memory_total_bytes=d.memory_total_bytes)
                for d in hardware.devices()
            ],
            onnxruntime_providers=hardware.onnxruntime_providers(),
            max_receive_message_bytes=self._state.settings.max_receive_message_bytes,
            start_time=self._state.start_time,
        )

    async def ListBackbones(self, request: pb.ListBackbonesRequest, context) -> pb.ListBackbonesResponse:
        return await asyncio.to_thread(
            backbones.list_backbones_response, request.family, request.cached_only, self._state.settings.weights_dir
        )


for _method, _part in _NOT_YET_BUILT.items():
    setattr(TLServeServicer, _method, _not_yet_built(_method, _part))
