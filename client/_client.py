"""The synchronous tlserve client, `Client`: one typed method per RPC of tlserve.v1.TLServe.

A backend service creates one `Client` per server address and shares it across
threads (a gRPC channel is thread-safe):

    with Client("tlserve:50051") as tl:
        job = tl.fine_tune(dataset="flowers", model_name="flowers", backbone="resnet18")
        for event in tl.watch_job(job.id):
            print(event.epoch, event.val_accuracy)

Methods take friendly keywords, build the request with the helpers in `_common`,
and return the generated proto messages. Unary calls carry the client's deadline
unless given `timeout=`; streaming calls have none unless given one. Every
grpc.RpcError comes out as a `TLServeError`.

Generated from `_aio.py` by scripts/gen_sync_client.py (`make sync-client`): edit
that file, not this one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from tlserve.client import _common as c
from tlserve.client._common import ProgressFn, TLServeError
from tlserve.client._streams import ResponseStream
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.client.tlserve.v1 import tlserve_pb2_grpc


class Client:
    """Synchronous client of one tlserve server, safe to share across threads.

    `timeout` is the default deadline of unary calls in seconds (None: no
    deadline). `metadata` is sent with every call. `token` is a bearer token
    for a server started with --auth-tokens-file; `tls` (a `TLS`) connects over
    TLS, with a client certificate for mutual TLS. A `channel` given by the
    caller is used as is (its options and credentials are the caller's) and not
    closed by `close()`.

        Client("tlserve.example:50051", token=os.environ["TLSERVE_TOKEN"], tls=TLS(ca_file="ca.pem"))
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        timeout: float | None = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        tls: c.TLS | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        credentials, self.metadata = c.channel_security(token, tls, tuple(metadata))
        self._owns_channel = channel is None
        if channel is None:
            options = c.channel_options(max_message_bytes)
            channel = (
                grpc.secure_channel(address, credentials, options=options)
                if credentials is not None
                else grpc.insecure_channel(address, options=options)
            )
        self._channel = channel
        self._stub = tlserve_pb2_grpc.TLServeStub(self._channel)

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------

    def _unary(self, name: str, request: Any, timeout: float | None) -> Any:
        try:
            return getattr(self._stub, name)(
                request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata
            )
        except grpc.RpcError as err:
            raise c.error_from_rpc(err, c.method_path(name)) from err

    def _stream(self, name: str, request: Any, timeout: float | None) -> ResponseStream[Any]:
        call = getattr(self._stub, name)(request, timeout=timeout, metadata=self.metadata)
        return ResponseStream(call, c.method_path(name))

    # --- health ---------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of `service` ("" = the whole server), e.g. "SERVING"."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        method = c.method_path("Check", c.HEALTH_SERVICE)
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self.metadata,
            )
        except grpc.RpcError as err:
            raise c.error_from_rpc(err, method) from err
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float, service: str = "") -> None:
        """Polls health until SERVING; raises TLServeError(DEADLINE_EXCEEDED) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TLServeError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{self.address} not SERVING after {timeout:g}s (last: {last})",
                    c.method_path("Check", c.HEALTH_SERVICE),
                )
            try:
                last = self.health(service, timeout=min(left, 5.0))
                if last == "SERVING":
                    return
            except TLServeError as err:
                last = str(err)
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    # --- server and backbones -------------------------------------------------

    def get_server_info(self, *, timeout: float | None = None) -> pb.ServerInfo:
        """Server version, devices and ONNX Runtime providers."""
        return self._unary("GetServerInfo", pb.GetServerInfoRequest(), timeout)

    def list_backbones(
        self, family: str = "", *, cached_only: bool = False, timeout: float | None = None
    ) -> pb.ListBackbonesResponse:
        """Backbones the server can fine-tune, optionally one family or cached weights only."""
        return self._unary("ListBackbones", pb.ListBackbonesRequest(family=family, cached_only=cached_only), timeout)

    # --- datasets ---------------------------------------------------------------

    def upload_dataset(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        split: pb.SplitOptions | None = None,
        chunk_size: int = 1 << 20,
        progress: ProgressFn | None = None,
        timeout: float | None = None,
    ) -> pb.Dataset:
        """Uploads an archive file, or a directory zipped on the fly, as dataset `name`."""
        archive = c.prepare_archive(path)
        try:
            requests = c.upload_requests(archive, name, c.split_options(split), chunk_size, progress)
            try:
                return self._stub.UploadDataset(requests, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as err:
                raise c.error_from_rpc(err, c.method_path("UploadDataset")) from err
        finally:
            archive.cleanup()

    def register_dataset(
        self, path: str, name: str, *, split: pb.SplitOptions | None = None, timeout: float | None = None
    ) -> pb.Dataset:
        """Registers a directory under the server's data root as dataset `name`."""
        request = pb.RegisterDatasetRequest(name=name, path=path, split=c.split_options(split))
        return self._unary("RegisterDataset", request, timeout)

    def get_dataset(self, dataset: str, *, timeout: float | None = None) -> pb.Dataset:
        """A dataset by id or name."""
        return self._unary("GetDataset", pb.GetDatasetRequest(dataset=dataset), timeout)

    def list_datasets(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> pb.ListDatasetsResponse:
        """One page of datasets."""
        return self._unary("ListDatasets", pb.ListDatasetsRequest(page_size=page_size, page_token=page_token), timeout)

    def delete_dataset(self, dataset: str, *, timeout: float | None = None) -> pb.DeleteDatasetResponse:
        """Deletes a dataset by id or name."""
        return self._unary("DeleteDataset", pb.DeleteDatasetRequest(dataset=dataset), timeout)

    # --- jobs -------------------------------------------------------------------

    def fine_tune(
        self,
        request: pb.FineTuneRequest | None = None,
        *,
        dataset: str | None = None,
        model_name: str | None = None,
        backbone: str | None = None,
        weights: str | pb.WeightsSource | None = None,
        strategy: str | int | None = None,
        trainable_groups: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        optimizer: str | int | None = None,
        patience: int | None = None,
        training: pb.TrainingOptions | None = None,
        augmentation: pb.AugmentationOptions | None = None,
        devices: int | None = None,
        seed: int | None = None,
        image_size: int | None = None,
        idempotency_key: str | None = None,
        labels: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> pb.Job:
        """Queues a fine-tuning job from a full request or from keywords; returns it QUEUED.

        `weights` is a spec ("DEFAULT", "none", "file:PATH", "model:NAME[:V]")
        or a WeightsSource; epochs, batch_size, learning_rate and optimizer
        fill `training`, and patience its early stopping (0: every epoch runs).
        """
        # The keywords are exactly fine_tune_request's; pass them on by name.
        kw = {k: v for k, v in locals().items() if k not in ("self", "request", "timeout")}
        return self._unary("FineTune", c.fine_tune_request(request, **kw), timeout)

    def get_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        return self._unary("GetJob", pb.GetJobRequest(job_id=job_id), timeout)

    def list_jobs(
        self,
        state: str | int | None = None,
        *,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListJobsResponse:
        """One page of jobs, optionally only those in `state` ("running", pb.JOB_STATE_FAILED, ...)."""
        request = pb.ListJobsRequest(
            state=c.enum_value(pb.JobState, state), page_size=page_size, page_token=page_token
        )
        return self._unary("ListJobs", request, timeout)

    def cancel_job(self, job_id: str, *, timeout: float | None = None) -> pb.Job:
        """Stops a queued or running job; returns it as it is after the call."""
        return self._unary("CancelJob", pb.CancelJobRequest(job_id=job_id), timeout)

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> ResponseStream[pb.JobEvent]:
        """Progress events of a job, the latest first; ends at a terminal state."""
        return self._stream("WatchJob", pb.WatchJobRequest(job_id=job_id), timeout)

    # --- models -------------------------------------------------------------------

    def list_models(
        self,
        name: str = "",
        *,
        latest_only: bool = False,
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> pb.ListModelsResponse:
        """One page of model versions, optionally of one model or the latest of each."""
        request = pb.ListModelsRequest(
            name=name, latest_only=latest_only, page_size=page_size, page_token=page_token
        )
        return self._unary("ListModels", request, timeout)

    def get_model(
        self, model: str | pb.ModelRef, *, version: int | None = None, timeout: float | None = None
    ) -> pb.Model:
        """A model version: "name" (latest), "name:3" or a ModelRef."""
        return self._unary("GetModel", pb.GetModelRequest(model=c.model_ref(model, version)), timeout)

    def delete_model(
        self,
        model: str | pb.ModelRef,
        *,
        version: int | None = None,
        all_versions: bool = False,
        timeout: float | None = None,
    ) -> pb.DeleteModelResponse:
        """Deletes one version, or every version of a name with `all_versions`."""
        request = pb.DeleteModelRequest(model=c.model_ref(model, version), all_versions=all_versions)
        return self._unary("DeleteModel", request, timeout)

    def export_model(
        self,
        model: str | pb.ModelRef,
        *,
        version: int | None = None,
        precision: str | int | None = None,
        input_format: str | int | None = None,
        include_embedding: bool = False,
        opset: int = 0,
        max_accuracy_drop_points: float | None = None,
        calibration: pb.CalibrationOptions | None = None,
        timeout: float | None = None,
    ) -> pb.ModelArtifact:
        """Exports a model version to ONNX in one precision ("fp32", "fp16", "int8")."""
        request = c.export_request(
            model,
            version=version,
            precision=precision,
            input_format=input_format,
            include_embedding=include_embedding,
            opset=opset,
            max_accuracy_drop_points=max_accuracy_drop_points,
            calibration=calibration,
        )
        return self._unary("ExportModel", request, timeout)

    def download_model(
        self,
        model: str | pb.ModelRef,
        dest_path: str | os.PathLike[str],
        *,
        version: int | None = None,
        precision: str | int | None = None,
        format: str | int | None = None,
        input_format: str | int | None = None,
        chunk_size_bytes: int = 0,
        progress: ProgressFn | None = None,
        timeout: float | None = None,
    ) -> pb.ModelArtifact:
        """Downloads an artifact to `dest_path`, verified (size, sha256) and renamed into place."""
        request = c.download_request(
            model,
            version=version,
            format=format,
            precision=precision,
            input_format=input_format,
            chunk_size_bytes=chunk_size_bytes,
        )
        stream = self._stream("DownloadModel", request, timeout)
        receiver = c.ArtifactReceiver(dest_path, c.method_path("DownloadModel"), progress)
        try:
            for response in stream:
                receiver.feed(response)
            return receiver.finish()
        except BaseException:
            stream.cancel()
            receiver.abort()
            raise

    def profile_model(
        self,
        model: str | pb.ModelRef,
        *,
        version: int | None = None,
        variants: Iterable[pb.Variant | tuple[str | int, str | int]] = (),
        batch_size: int = 0,
        iterations: int = 0,
        measure_accuracy: bool = False,
        timeout: float | None = None,
    ) -> pb.ModelProfile:
        """Latency, throughput, memory and size of a model's variants on the server's hardware."""
        request = c.profile_request(
            model,
            version=version,
            variants=variants,
            batch_size=batch_size,
            iterations=iterations,
            measure_accuracy=measure_accuracy,
        )
        return self._unary("ProfileModel", request, timeout)

    def compare_backbones(
        self,
        dataset: str,
        backbones: Iterable[str] = (),
        *,
        max_images_per_class: int = 0,
        weights: str = "",
        image_size: int = 0,
        timeout: float | None = None,
    ) -> pb.CompareBackbonesResponse:
        """Linear-probe accuracy and cost of several backbones on one dataset; `weights` is
        "DEFAULT" (the server's cached pretrained weights) or "NONE", `image_size` 0 each
        backbone's own."""
        request = pb.CompareBackbonesRequest(
            dataset=dataset,
            backbones=list(backbones),
            max_images_per_class=max_images_per_class,
            weights=weights,
            image_size=image_size,
        )
        return self._unary("CompareBackbones", request, timeout)

    # --- inference ------------------------------------------------------------------

    def predict(
        self,
        model: str | pb.ModelRef,
        images: Iterable[bytes | pb.ImageInput | pb.Tensor],
        *,
        version: int | None = None,
        top_k: int = 0,
        runtime: str | int | None = None,
        precision: str | int | None = None,
        return_logits: bool = False,
        return_embeddings: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> pb.PredictResponse:
        """Top-k labels for each image (encoded file bytes, or a uint8 HWC Tensor)."""
        request = c.predict_request(
            model,
            images,
            version=version,
            top_k=top_k,
            runtime=runtime,
            precision=precision,
            return_logits=return_logits,
            return_embeddings=return_embeddings,
            request_id=request_id,
        )
        return self._unary("Predict", request, timeout)

    def predict_stream(
        self,
        requests: Iterable[pb.PredictRequest],
        *,
        timeout: float | None = None,
    ) -> ResponseStream[pb.PredictResponse]:
        """One response per request, in order; a bad request's response has `error` set."""
        return self._stream("PredictStream", c.request_iterator(requests), timeout)
