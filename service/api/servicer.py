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
from service.datasets import Datasets
from service.errors import InvalidArgument, Unimplemented
from service.jobs.service import JobService
from service.store.models import ModelStore

# RPC → the part of tlserve that will provide it.
_NOT_YET_BUILT: dict[str, str] = {
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
    """What the servicer calls into: settings and the domain objects."""

    settings: Settings
    start_time: timestamp_pb2.Timestamp
    datasets: Datasets
    jobs: JobService
    models: ModelStore


class TLServeServicer(tlserve_pb2_grpc.TLServeServicer):
    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._datasets = state.datasets
        self._jobs = state.jobs
        self._models = state.models

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

    # --- datasets ---------------------------------------------------------

    async def UploadDataset(self, request_iterator, context) -> pb.Dataset:
        upload = None
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("payload")
                if upload is None:
                    if kind != "metadata":
                        raise InvalidArgument("the first UploadDataset message must carry metadata, then chunks follow")
                    upload = await asyncio.to_thread(self._datasets.begin_upload, message.metadata)
                elif kind == "chunk":
                    await asyncio.to_thread(upload.write, message.chunk)
                else:
                    raise InvalidArgument("UploadDataset metadata may only be sent once, in the first message")
            if upload is None:
                raise InvalidArgument("UploadDataset received no messages: send metadata, then the archive in chunks")
            return await asyncio.to_thread(upload.finish)
        except BaseException:
            # A rejected or cancelled upload leaves nothing behind.
            if upload is not None:
                await asyncio.to_thread(upload.abort)
            raise

    async def RegisterDataset(self, request: pb.RegisterDatasetRequest, context) -> pb.Dataset:
        return await asyncio.to_thread(self._datasets.register, request.name, request.path, request.split)

    async def GetDataset(self, request: pb.GetDatasetRequest, context) -> pb.Dataset:
        return await asyncio.to_thread(self._datasets.get, request.dataset)

    async def ListDatasets(self, request: pb.ListDatasetsRequest, context) -> pb.ListDatasetsResponse:
        datasets, token = await asyncio.to_thread(self._datasets.list, request.page_size, request.page_token)
        return pb.ListDatasetsResponse(datasets=datasets, next_page_token=token)

    async def DeleteDataset(self, request: pb.DeleteDatasetRequest, context) -> pb.DeleteDatasetResponse:
        await asyncio.to_thread(self._datasets.delete, request.dataset)
        return pb.DeleteDatasetResponse()

    # --- jobs -------------------------------------------------------------

    async def FineTune(self, request: pb.FineTuneRequest, context) -> pb.Job:
        return await asyncio.to_thread(self._jobs.submit, request)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return await asyncio.to_thread(self._jobs.get, request.job_id)

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        jobs, token = await asyncio.to_thread(self._jobs.list, request.state, request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return await self._jobs.cancel(request.job_id)

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        async for event in self._jobs.watch(request.job_id):
            yield event

    # --- models -----------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        models, token = await asyncio.to_thread(
            self._models.list, request.name, request.latest_only, request.page_size, request.page_token
        )
        return pb.ListModelsResponse(models=models, next_page_token=token)

    async def GetModel(self, request: pb.GetModelRequest, context) -> pb.Model:
        return await asyncio.to_thread(self._models.get, request.model.name, request.model.version)

    async def DeleteModel(self, request: pb.DeleteModelRequest, context) -> pb.DeleteModelResponse:
        deleted = await asyncio.to_thread(self._models.delete, request.model, request.all_versions)
        return pb.DeleteModelResponse(deleted=deleted)


for _method, _part in _NOT_YET_BUILT.items():
    setattr(TLServeServicer, _method, _not_yet_built(_method, _part))
