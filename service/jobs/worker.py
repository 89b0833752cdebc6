"""`python -m tlserve.service.jobs.worker --job-id ID --home HOME`: run one fine-tuning job.

Started by the job runner (or by torchrun, once per device, for `devices > 1`;
or as a Kubernetes Job on another node that mounts the same TLSERVE_HOME). It
reads the job from the metadata store, trains with `service.training`,
reports progress and the outcome back to the store, and on success publishes
the model version: the PyTorch state dict in the artifact store and the model
row with its lineage and metrics.

Starting it again with the same job id resumes from the job's last checkpoint.
Under torchrun only rank 0 talks to the store. Exit code 0 means the outcome
(SUCCEEDED, FAILED with a reason, CANCELLED) is recorded; anything else means
the worker crashed and the runner records why.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import time

import torch

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones, logs
from tlserve.service.config import Settings
from tlserve.service.errors import Cancelled, TLServeError
from tlserve.service.childproc import die_with_parent
from tlserve.service.jobs.weights import weights_choice
from tlserve.service.manifest import Manifest
from tlserve.service.store import ArtifactStore, MetadataStore
from tlserve.service.clock import now
from tlserve.service.store.jobs import JobStore
from tlserve.service.store.models import ModelStore
from tlserve.service.variant import Variant
from tlserve.service.training import protocol
from tlserve.service.training.config import TrainConfig
from tlserve.service.training.engine import TrainResult, fine_tune

log = logging.getLogger("tlserve.worker")

# How often the cancel flag is read from the store, at most (it is polled every step).
CANCEL_CHECK_SECONDS = 0.5


class StoreReporter:
    """Sends the engine's progress events to the store (rank 0 only) and reads the cancel flag."""

    def __init__(self, jobs: JobStore, job_id: str, rank: int) -> None:
        self._jobs, self._job_id, self._rank = jobs, job_id, rank
        self._checked_at = 0.0
        self._cancelled = False

    def report(self, event: pb.JobEvent) -> None:
        if self._rank == 0:
            self._jobs.append_event(self._job_id, event)

    def cancelled(self) -> bool:
        if not self._cancelled and time.monotonic() - self._checked_at > CANCEL_CHECK_SECONDS:
            self._checked_at = time.monotonic()
            self._cancelled = self._jobs.cancel_requested(self._job_id)
        return self._cancelled


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        # torchrun sets LOCAL_RANK: one GPU per process.
        index = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def measure_gflops(backbone: str, result: TrainResult) -> float:
    """GFLOPs of one image at the trained resolution (`backbones.count_gflops`), on the
    published weights loaded into the real architecture."""
    built = backbones.build(
        backbone, len(result.class_names), weights=backbones.WeightsChoice(kind="none"),
        weights_dir=".", image_size=result.preprocessing.crop_size,
    )
    built.model.load_state_dict(result.state_dict)  # proves the published weights fit the architecture
    built.model.eval()
    return backbones.count_gflops(built.model, result.preprocessing.crop_size)


def publish(job: pb.Job, result: TrainResult, parent: pb.ModelRef | None, *, models: ModelStore) -> pb.ModelRef:
    """Stores the weights and the model row under the next free version of the name."""
    buffer = io.BytesIO()
    torch.save(result.state_dict, buffer)
    request = job.request
    crop = result.preprocessing.crop_size
    artifact = pb.ModelArtifact(
        format=pb.ARTIFACT_FORMAT_PYTORCH, precision=pb.PRECISION_FP32, input_format=pb.INPUT_FORMAT_FLOAT_NCHW,
        inputs=[pb.TensorSpec(name="input", dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, 3, crop, crop])],
        outputs=[pb.TensorSpec(name="logits", dtype=pb.DATA_TYPE_FLOAT32, shape=[-1, len(result.class_names)])],
        test_top1_accuracy=result.test.top1_accuracy, create_time=now(),
    )
    model = pb.Model(
        name=request.model_name, create_time=now(), backbone=request.backbone,
        class_names=result.class_names, preprocessing=result.preprocessing.to_proto(),
        lineage=pb.Lineage(
            dataset_id=request.dataset, backbone=request.backbone, weights=request.weights,
            strategy=result.decision.strategy, hyperparameters=result.config.to_request(), parent=parent,
        ),
        job_id=job.id, val_metrics=result.val, test_metrics=result.test, decision=result.decision,
        parameter_count=result.parameter_count, gflops=measure_gflops(request.backbone, result), labels=request.labels,
    )
    published = models.publish_next_version(model, artifact, buffer.getvalue(), Variant.PYTORCH)
    return pb.ModelRef(name=published.name, version=published.version)


def run(job_id: str, settings: Settings) -> int:
    rank = int(os.environ.get("RANK", 0))
    metadata = MetadataStore(settings.database_path)
    artifacts = ArtifactStore(settings.artifacts_dir)
    jobs, models = JobStore(metadata), ModelStore(metadata, artifacts)
    job = jobs.get(job_id)
    if rank == 0:
        def start(j: pb.Job) -> None:
            j.state = pb.JOB_STATE_RUNNING
            j.attempts += 1
            if not j.HasField("start_time"):
                j.start_time.CopyFrom(now())
        job = jobs.update(job_id, start)
        jobs.append_event(job_id, pb.JobEvent(state=pb.JOB_STATE_RUNNING, phase=pb.JOB_PHASE_PREPARING,
                                              message=f"worker started (attempt {job.attempts}, pid {os.getpid()})"))
    checkpoint_dir = settings.checkpoints_dir / job_id
    try:
        request = job.request
        manifest = Manifest.load(settings.datasets_dir / request.dataset / "manifest.json")
        weights, parent = weights_choice(request.weights, request.backbone, settings=settings, models=models,
                                         artifacts=artifacts, load=True)
        device = pick_device()
        config = TrainConfig.from_request(
            request, num_classes=len(manifest.class_names),
            train_images_per_class=protocol.choose(manifest, request).images_per_class(len(manifest.class_names)),
            device_type=device.type,
        )
        result = fine_tune(config, manifest, weights=weights, weights_dir=settings.weights_dir,
                           checkpoint_dir=checkpoint_dir, reporter=StoreReporter(jobs, job_id, rank), device=device)
        if rank != 0:
            return 0
        jobs.append_event(job_id, pb.JobEvent(phase=pb.JOB_PHASE_PUBLISHING, message="publishing the model"))
        ref = publish(job, result, parent, models=models)

        def succeed(j: pb.Job) -> None:
            j.model.CopyFrom(ref)
            j.decision.CopyFrom(result.decision)

        jobs.update(job_id, succeed)
        jobs.transition(job_id, pb.JOB_STATE_SUCCEEDED,
                        message=f"published {ref.name}:{ref.version}, test top-1 {result.test.top1_accuracy:.1%}")
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    except Cancelled:
        if rank == 0:
            jobs.transition(job_id, pb.JOB_STATE_CANCELLED, message="cancelled")
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    except TLServeError as e:
        log.warning("job failed", extra={"fields": {"job_id": job_id, "error": str(e)}})
        if rank == 0:
            jobs.transition(job_id, pb.JOB_STATE_FAILED, error=str(e))
    except Exception as e:
        log.exception("training worker crashed", extra={"fields": {"job_id": job_id}})
        if rank == 0:
            jobs.transition(job_id, pb.JOB_STATE_FAILED,
                            error=f"internal error in the training worker: {type(e).__name__}: {e}")
        return 1
    finally:
        metadata.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="python -m tlserve.service.jobs.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--job-id", required=True)
    args, settings_argv = parser.parse_known_args(argv)
    settings = Settings.load(settings_argv)
    logs.setup(settings.log_level, settings.log_format)
    logs.request_id.set(args.job_id)
    return run(args.job_id, settings)


if __name__ == "__main__":
    sys.exit(main())
