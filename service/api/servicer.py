"""The tlserve.v1.TLServe servicer.

Each method validates its request, makes one call into the domain and converts
the result back; domain errors propagate and `ErrorInterceptor` turns them into
status codes. Blocking work runs in the default executor (sized from config),
never on the event loop.

Predict and PredictStream hand the caller's deadline to the inference service,
which drops work whose deadline has passed before computing it; a client that
cancels cancels the handler task, which frees its place in the model's queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

from google.protobuf import timestamp_pb2

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.client.tlserve.v1 import tlserve_pb2_grpc
from tlserve.service import backbones, hardware
from tlserve.service.api.interceptors import status_for
from tlserve.service.api.streams import call_deadline, ordered_replies
from tlserve.service.config import Settings
from tlserve.service.datasets import Datasets
from tlserve.service.errors import InvalidArgument, TLServeError
from tlserve.service.export.exporter import ExportService
from tlserve.service.inference.predictor import InferenceService
from tlserve.service.jobs.control import JobService
from tlserve.service.profiling.compare import BackboneComparer
from tlserve.service.profiling.profile import ProfileService
from tlserve.service.store.models import ModelStore

# PredictStream requests computed at once per stream; replies still go out in order.
STREAM_WINDOW = 32


@dataclasses.dataclass(frozen=True)
class ServerState:
    """What the servicer calls into: settings and the domain objects."""

    settings: Settings
    start_time: timestamp_pb2.Timestamp
    datasets: Datasets
    jobs: JobService
    models: ModelStore
    exports: ExportService
    inference: InferenceService
    profiles: ProfileService
    compare: BackboneComparer


class TLServeServicer(tlserve_pb2_grpc.TLServeServicer):
    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._datasets = state.datasets
        self._jobs = state.jobs
        self._models = state.models
        self._exports = state.exports
        self._inference = state.inference

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
        for ref in deleted:
            self._inference.evict(ref.name, ref.version)  # its sessions give their memory back now
        return pb.DeleteModelResponse(deleted=deleted)

    # --- export -----------------------------------------------------------

    async def ExportModel(self, request: pb.ExportModelRequest, context) -> pb.ModelArtifact:
        artifact = await asyncio.to_thread(self._exports.export, request)
        # A re-export replaces a variant's file: sessions of the old one must not keep answering.
        self._inference.evict(artifact.model.name, artifact.model.version)
        return artifact

    async def DownloadModel(self, request: pb.DownloadModelRequest, context):
        chunks = await asyncio.to_thread(self._exports.download, request)
        try:
            while (response := await asyncio.to_thread(next, chunks, None)) is not None:
                yield response
        finally:
            chunks.close()

    # --- profiling --------------------------------------------------------

    async def ProfileModel(self, request: pb.ProfileModelRequest, context) -> pb.ModelProfile:
        cancelled = threading.Event()  # stops the profile before its next variant
        try:
            return await asyncio.to_thread(self._state.profiles.profile, request, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def CompareBackbones(self, request: pb.CompareBackbonesRequest, context) -> pb.CompareBackbonesResponse:
        cancelled = threading.Event()  # stops the comparison's child process
        try:
            return await asyncio.to_thread(self._state.compare.compare, request, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    # --- inference --------------------------------------------------------

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        return await self._inference.predict(request, deadline=call_deadline(context))

    async def PredictStream(self, request_iterator, context):
        """Replies in request order; each request is computed as soon as it arrives
        (up to STREAM_WINDOW at once), so a stream batches with itself and others.
        A failed request gets a reply with `error` set and the stream goes on."""
        deadline = call_deadline(context)
        async for reply in ordered_replies(
            request_iterator, lambda request: self._predict_in_stream(request, deadline), STREAM_WINDOW,
        ):
            yield reply

    async def _predict_in_stream(self, request: pb.PredictRequest, deadline: float | None) -> pb.PredictResponse:
        try:
            return await self._inference.predict(request, deadline=deadline)
        except TLServeError as e:
            return pb.PredictResponse(
                request_id=request.request_id,
                error=pb.PredictError(code=status_for(e).value[0], message=str(e)),
            )
