"""A published tlserve model, made in-process for export and inference tests.

The same path a fine-tune job takes, without the job queue: a procedural shapes
dataset is registered under a home's data root, trained with the real engine
(resnet18 from random weights at 32 px, FULL, a few epochs, one thread) and
published with the worker's own `publish`. The model learns the shapes well
above chance, so accuracy deltas of exported variants are meaningful.

    settings, model = published_model(tmp_path / "home")
"""

from __future__ import annotations

import pathlib

import torch

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones
from tlserve.service.config import Settings
from tlserve.service.datasets import Datasets
from tlserve.service.jobs.worker import publish
from tlserve.service.manifest import Manifest
from tlserve.service.store.artifacts import ArtifactStore
from tlserve.service.store.metadata import MetadataStore
from tlserve.service.store.models import ModelStore, model_dir
from tlserve.service.variant import Variant
from tlserve.service.training.config import TrainConfig
from tlserve.service.training.engine import fine_tune
from tlserve.service.training.selfcheck import PrintReporter
from tlserve.service.training.synthetic import TARGET_SHAPES, write_image_folder

CLASSES = TARGET_SHAPES[:3]


def published_model(
    home: pathlib.Path,
    *,
    name: str = "shapes",
    backbone: str = "resnet18",
    image_size: int = 32,
    images_per_class: int = 24,
    epochs: int = 6,
    seed: int = 7,
) -> tuple[Settings, pb.Model]:
    """Settings for `home` (data root `home/data`) and the published model (version 1)."""
    home = pathlib.Path(home)
    data_root = home / "data"
    settings = Settings.load(["--home", str(home), "--data-root", str(data_root)])
    folder = data_root / "shapes"
    if not folder.exists():
        write_image_folder(folder, CLASSES, images_per_class, size=image_size, seed=seed)
    metadata = MetadataStore(settings.database_path)
    try:
        datasets = Datasets(settings, metadata)
        dataset = datasets.register("shapes", "shapes", pb.SplitOptions())
        manifest = Manifest.load(settings.datasets_dir / dataset.id / "manifest.json")
        request = pb.FineTuneRequest(
            dataset=dataset.id, model_name=name, backbone=backbone,
            weights=pb.WeightsSource(scratch=pb.WeightsSource.Scratch()),
            strategy=pb.STRATEGY_FULL, image_size=image_size, seed=seed,
            training=pb.TrainingOptions(epochs=epochs, batch_size=8),
        )
        config = TrainConfig.from_request(
            request, num_classes=len(manifest.class_names),
            train_images_per_class=len(manifest.splits["train"]) / len(manifest.class_names),
            device_type="cpu",
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = fine_tune(
                config, manifest, weights=backbones.WeightsChoice(kind="none"), weights_dir=settings.weights_dir,
                checkpoint_dir=home / "checkpoints" / "factory", reporter=PrintReporter(quiet=True),
                device=torch.device("cpu"),
            )
        finally:
            torch.set_num_threads(threads)
        artifacts = ArtifactStore(settings.artifacts_dir)
        models = ModelStore(metadata, artifacts)
        job = pb.Job(id="job-factory", request=request)
        ref = publish(job, result, None, models=models)
        return settings, models.get(ref.name, ref.version)
    finally:
        metadata.close()


def publish_copy(models: ModelStore, artifacts: ArtifactStore, model: pb.Model, *, name: str | None = None,
                 dataset_id: str | None = None) -> int:
    """Publishes the next version of model `name` (default: `model`'s) with `model`'s
    weights (its PyTorch artifact only), trained on `dataset_id` (default: the same);
    returns that version."""
    copy = pb.Model()
    copy.CopyFrom(model)
    copy.name = name or model.name
    copy.version = models.next_version(copy.name)
    if dataset_id is not None:
        copy.lineage.dataset_id = dataset_id
    path = f"{model_dir(copy.name, copy.version)}/model.pt"
    weights = artifacts.path(models.artifact_path(model.name, model.version, Variant.PYTORCH)).read_bytes()
    info = artifacts.publish_bytes(weights, path)
    stored = pb.ModelArtifact()
    stored.CopyFrom([a for a in model.artifacts if Variant.of_artifact(a).is_pytorch][0])
    stored.model.name, stored.model.version, stored.sha256 = copy.name, copy.version, info.sha256
    models.publish(copy, [(stored, path)])
    return copy.version
