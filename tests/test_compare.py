"""CompareBackbones: linear probes on frozen features of candidate backbones, and what
each would cost to serve.

Unit tests for the pure pieces (the linear probe, the folds, which images train and
score the probes, the request's checks); one live server, driven through the client as
a user would: a comparison, a second one refused meanwhile, a cancelled one that stops
its process, every bad input answered with its status while the server keeps serving;
and the DEFAULT-weights path in-process with weights files made here (no download).

Tiny on purpose: 32 px images, randomly initialised backbones (weights NONE), a few
images per class. The dataset's classes are colours, which even random convolutional
features separate, so the probes must score far above chance.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import pathlib
import signal
import time
import types

import grpc
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import tlserve.client as tlclient
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones
from tlserve.service.errors import FailedPrecondition, InvalidArgument
from tlserve.service.manifest import Manifest
from tlserve.service.profiling import compare
from tlserve.service.training import strategies
from tests.serverproc import ServerProcess, serving

COLOURS = {"blue": (50, 60, 210), "green": (40, 180, 60), "red": (200, 40, 40)}
PAIR = ["mobilenet_v3_small", "resnet18"]


def write_colours(root: pathlib.Path, per_class: int, seed: int, size: int = 32) -> pathlib.Path:
    """root/<colour>/<colour>_NNN.png: a colour under strong per-pixel noise."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:03d}.png")
    return root


# -- the linear probe ------------------------------------------------------------------------


def _clusters(n: int, num_classes: int, dim: int, seed: int, spread: float = 3.0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * spread
    labels = torch.arange(n) % num_classes
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """L-BFGS on small problems is overhead-bound: one thread is faster on 2 shared cores."""


def test_linear_probe_separates_well_separated_classes():
    train_x, train_y = _clusters(120, 4, 32, seed=1)
    val_x, val_y = _clusters(120, 4, 32, seed=2)
    probe = strategies.fit_linear_probe(train_x, train_y, 4)
    assert probe.accuracy(val_x, val_y) >= 0.99
    assert probe.weight.shape == (4, 32) and probe.bias.shape == (4,)
    assert probe.weight_decay in strategies.LINEAR_PROBE_WEIGHT_DECAYS
    assert probe.cross_validated


def test_linear_probe_on_random_labels_scores_about_chance():
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(800, 32, generator=generator)
    labels = torch.randint(0, 4, (800,), generator=generator)
    accuracy = strategies.fit_linear_probe(features[:400], labels[:400], 4).accuracy(features[400:], labels[400:])
    assert abs(accuracy - 0.25) < 0.08


def test_linear_probe_is_deterministic():
    features, labels = _clusters(90, 3, 16, seed=4, spread=0.5)  # overlapping: a non-trivial optimum
    first = strategies.fit_linear_probe(features, labels, 3, seed=5)
    torch.randn(1000)  # whatever ran before
    second = strategies.fit_linear_probe(features, labels, 3, seed=5)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.weight_decay == second.weight_decay


def test_linear_probe_finds_a_direction_that_class_means_miss():
    # The classes differ along one quiet dimension; 19 loud ones carry only noise.
    generator = torch.Generator().manual_seed(6)
    labels = torch.arange(400) % 2
    features = torch.randn(400, 20, generator=generator) * 10
    features[:, 0] = (labels.float() * 2 - 1) * 0.5 + 0.1 * torch.randn(400, generator=generator)
    probe = strategies.fit_linear_probe(features[:200], labels[:200], 2)
    assert probe.accuracy(features[200:], labels[200:]) >= 0.97
    weight, bias = strategies.prototype_weights(features[:200], labels[:200], 2)
    nearest_mean = ((features[200:] @ weight.T + bias).argmax(dim=1) == labels[200:]).double().mean().item()
    assert nearest_mean < 0.75


def test_probe_weights_go_into_a_head_as_they_are():
    features, labels = _clusters(60, 3, 8, seed=7)
    features = features * 5 + 2  # far from standardised: the folding must undo it
    probe = strategies.fit_linear_probe(features, labels, 3)
    built = types.SimpleNamespace(head=nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 3)))  # a BuiltModel's head
    strategies.set_head(built, probe.weight, probe.bias)
    built.head.eval()
    with torch.no_grad():
        assert torch.allclose(built.head(features), probe.logits(features), atol=1e-4)


def test_a_class_too_small_for_folds_gets_the_default_weight_decay():
    features, labels = _clusters(8, 4, 8, seed=8)  # 2 images per class, 3 folds
    probe = strategies.fit_linear_probe(features, labels, 4)
    assert probe.weight_decay == strategies.LINEAR_PROBE_DEFAULT_WEIGHT_DECAY and not probe.cross_validated
    assert math.isnan(probe.accuracy(features[:0], labels[:0]))


def test_stratified_folds_deal_every_class_evenly():
    labels = torch.tensor([0] * 9 + [1] * 6 + [2] * 3)
    folds = strategies.stratified_folds(labels, 3, seed=1)
    for c in range(3):
        counts = torch.bincount(folds[labels == c], minlength=3)
        assert counts.max() - counts.min() == 0
    assert torch.equal(folds, strategies.stratified_folds(labels, 3, seed=1))
    assert not torch.equal(folds, strategies.stratified_folds(labels, 3, seed=2))


# -- which images train and score the probes ----------------------------------------------------


def _manifest(train: list[int], val: list[int], class_count: int = 3) -> Manifest:
    return Manifest(
        id="ds-00000000", name="m", root=pathlib.Path("/data"), class_names=tuple("abcdefgh"[:class_count]),
        splits={
            "train": tuple((f"t{i}.png", label) for i, label in enumerate(train)),
            "val": tuple((f"v{i}.png", label) for i, label in enumerate(val)),
            "test": (("x.png", 0),),
        },
    )


def test_probes_train_on_train_and_score_on_val_with_a_cap_per_class():
    manifest = _manifest(train=[0] * 10 + [1] * 4 + [2] * 1, val=[0, 1, 2])
    splits = compare.probe_splits(manifest, max_images_per_class=3)
    assert splits.val_source == "val" and [label for _, label in splits.val] == [0, 1, 2]
    assert sorted(label for _, label in splits.train) == [0, 0, 0, 1, 1, 1, 2]
    assert splits == compare.probe_splits(manifest, max_images_per_class=3)  # seeded
    assert len(compare.probe_splits(manifest, max_images_per_class=0).train) == 15
    assert all(not path.endswith("x.png") for path, _ in splits.train + splits.val)  # never the test split


def test_without_val_a_fifth_of_each_class_is_held_out_and_singletons_stay():
    manifest = _manifest(train=[0] * 10 + [1] * 2 + [2] * 1, val=[])
    splits = compare.probe_splits(manifest, max_images_per_class=0)
    assert splits.val_source == "train holdout"
    assert sorted(label for _, label in splits.val) == [0, 0, 1]
    assert sorted(label for _, label in splits.train) == [0] * 8 + [1, 2]
    assert not {path for path, _ in splits.train} & {path for path, _ in splits.val}


def test_without_val_and_nothing_to_hold_out_the_probe_cannot_be_scored():
    with pytest.raises(FailedPrecondition, match="no validation images"):
        compare.probe_splits(_manifest(train=[0, 1, 2], val=[]), max_images_per_class=0)


# -- the request ---------------------------------------------------------------------------------


def test_an_empty_request_means_the_default_set_and_default_weights_at_their_own_sizes():
    options = compare.Options.from_request(pb.CompareBackbonesRequest(dataset="d"))
    assert options.backbones == compare.DEFAULT_BACKBONES
    assert options.pretrained and options.image_size == 0 and options.max_images_per_class == 0
    assert not compare.Options.from_request(pb.CompareBackbonesRequest(dataset="d", weights="none")).pretrained


def test_a_size_that_a_backbone_cannot_take_is_refused_before_any_work():
    for name, size, fragment in [("convnext_tiny", 16, "too small"), ("vit_b_16", 100, "multiple of its patch")]:
        request = pb.CompareBackbonesRequest(dataset="d", backbones=[name], image_size=size, weights="NONE")
        with pytest.raises(InvalidArgument, match=fragment):
            compare.Options.from_request(request)


# -- through a live server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("compare") / "home", "--inference-threads", "1") as server:
        yield server


@pytest.fixture(scope="module")
def dataset(tl, tmp_path_factory) -> pb.Dataset:
    folder = write_colours(tmp_path_factory.mktemp("colours") / "colours", per_class=12, seed=1)
    # 12 images per class: 6 train, 5 val, 1 test.
    return tl.upload_dataset(folder, "colours", split=pb.SplitOptions(val_fraction=0.4, test_fraction=0.1))


def _compare(tl, **fields):
    try:
        return tl.compare_backbones(**fields)
    except tlclient.TLServeError as error:
        return error


@pytest.fixture(scope="module")
def two_at_once(tl, dataset):
    """The same comparison asked twice at the same moment: (results, seconds)."""
    fields = dict(dataset="colours", backbones=PAIR, weights="NONE", image_size=32, max_images_per_class=5)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _compare(tl, **fields), range(2)))
    return results, time.monotonic() - start


def test_a_comparison_probes_each_backbone_and_measures_its_cost(two_at_once, dataset):
    (response,) = [r for r in two_at_once[0] if isinstance(r, pb.CompareBackbonesResponse)]
    assert response.dataset_id == dataset.id and response.class_count == 3
    assert response.chance_accuracy == pytest.approx(1 / 3)
    val = next(s for s in dataset.splits if s.split == pb.SPLIT_VAL)
    assert response.train_image_count == 3 * 5 and response.val_image_count == val.image_count == 3 * 5
    assert sorted(r.backbone for r in response.results) == PAIR
    accuracies = [r.probe_accuracy for r in response.results]
    assert accuracies == sorted(accuracies, reverse=True)  # best first
    for r in response.results:
        assert r.probe_accuracy >= 0.8, r  # colours: far above chance (1/3) even in random features
        spec = backbones.get_spec(r.backbone)
        assert (r.weights, r.image_size, r.device) == ("NONE", 32, "cpu")
        assert 0 < r.latency_p50_seconds < 2 and 0 < r.feature_seconds < 60
        # The classifier as it would be fine-tuned: torchvision's model with a 3-class head.
        assert r.parameter_count == spec.default.parameter_count - 1000 * (r.feature_dim + 1) + 3 * (r.feature_dim + 1)
        assert r.file_size_bytes > 4 * r.parameter_count
        assert 0 < r.gflops < spec.default.gflops / 10  # 32 px: about (32/224)² of the pixels of 224
    assert {r.backbone: r.feature_dim for r in response.results} == {"mobilenet_v3_small": 1024, "resnet18": 512}


def test_a_second_comparison_meanwhile_is_refused(two_at_once):
    results, _ = two_at_once
    (refused,) = [r for r in results if isinstance(r, tlclient.TLServeError)]
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "one runs at a time" in refused.message and "mobilenet_v3_small, resnet18" in refused.message


def _comparison_processes(server: ServerProcess) -> list[int]:
    """Children of the server that multiprocessing spawned (the comparison's process)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server.proc.pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def test_a_comparison_whose_process_is_killed_fails_with_resource_exhausted(tl, server, dataset, two_at_once):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(_compare, tl, dataset="colours", backbones=PAIR, weights="NONE", image_size=32)
        deadline = time.monotonic() + 10
        while not (children := _comparison_processes(server)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert children, "no comparison process started"
        os.kill(children[0], signal.SIGKILL)  # what the out-of-memory killer does
        error = call.result()
    assert isinstance(error, tlclient.TLServeError) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "out of memory?" in error.message
    assert tl.health() == "SERVING"


def test_a_cancelled_comparison_stops_its_process_and_frees_the_slot(tl, server, dataset, two_at_once):
    # The client gives up after 1.5 s, long before the child has imported torch.
    error = _compare(tl, dataset="colours", backbones=PAIR, weights="NONE", image_size=32, timeout=1.5)
    assert isinstance(error, tlclient.TLServeError) and error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # Gone within a few polls, where finishing would take the child many seconds more.
    deadline = time.monotonic() + 3
    while _comparison_processes(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _comparison_processes(server) == []
    # The next call gets the slot (not RESOURCE_EXHAUSTED) and runs in a child: there,
    # a weights file made here fails the hash check that torchvision's file name implies.
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    path = backbones.weights_path(weights, server.home / "weights")
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    try:
        error = _compare(tl, dataset="colours", backbones=["mobilenet_v3_small"], weights="DEFAULT", image_size=32)
    finally:
        path.unlink()
    assert isinstance(error, tlclient.TLServeError) and error.code == grpc.StatusCode.FAILED_PRECONDITION, error
    assert "is corrupt or not MobileNet_V3_Small_Weights.IMAGENET1K_V1" in error.message
    assert str(path) in error.message


NINE = ["alexnet", "resnet18", "resnet34", "vgg11", "squeezenet1_0", "densenet121", "googlenet", "mnasnet0_5",
        "mobilenet_v2"]
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


@pytest.mark.parametrize(
    ("fields", "code", "fragments"),
    [
        ({"dataset": ""}, grpc.StatusCode.INVALID_ARGUMENT, ["dataset is required"]),
        ({"dataset": "nope"}, grpc.StatusCode.NOT_FOUND, ["nope"]),
        ({"backbones": ["resnet18", "resnet9000"]}, grpc.StatusCode.INVALID_ARGUMENT, ["'resnet9000'", "resnet50"]),
        ({"backbones": ["resnet18", "resnet18"]}, grpc.StatusCode.INVALID_ARGUMENT, ["'resnet18' more than once"]),
        ({"backbones": NINE}, grpc.StatusCode.INVALID_ARGUMENT, ["9 models", "at most 8"]),
        ({"max_images_per_class": -1}, grpc.StatusCode.INVALID_ARGUMENT, ["max_images_per_class", ">= 0"]),
        ({"image_size": 8}, grpc.StatusCode.INVALID_ARGUMENT, ["image_size", "16..1024"]),
        ({"image_size": 2000}, grpc.StatusCode.INVALID_ARGUMENT, ["image_size", "16..1024"]),
        ({"image_size": -32}, grpc.StatusCode.INVALID_ARGUMENT, ["image_size", "16..1024"]),
        ({"backbones": ["convnext_tiny"], "image_size": 16}, grpc.StatusCode.INVALID_ARGUMENT,
         ["too small for convnext_tiny", "minimum is 32"]),
        ({"weights": "IMAGENET1K_V1"}, grpc.StatusCode.INVALID_ARGUMENT, ["'DEFAULT'", "'NONE'", "IMAGENET1K_V1"]),
        ({"weights": "DEFAULT"}, grpc.StatusCode.FAILED_PRECONDITION,
         [f"download {RESNET18_URL} and place it at", "weights/resnet18-f37072fd.pth", "'NONE'"]),
        ({"weights": ""}, grpc.StatusCode.FAILED_PRECONDITION, ["ResNet18_Weights.IMAGENET1K_V1", RESNET18_URL]),
    ],
    ids=["no-dataset", "unknown-dataset", "unknown-backbone", "duplicate", "too-many", "negative-cap",
         "size-small", "size-large", "size-negative", "size-unfit", "weights-name", "uncached", "uncached-default"],
)
def test_bad_requests_get_the_status_that_names_the_fix(tl, dataset, fields, code, fragments):
    request = {"dataset": "colours", "backbones": ["resnet18"], "weights": "NONE", "image_size": 32, **fields}
    start = time.monotonic()
    error = _compare(tl, **request)
    assert isinstance(error, tlclient.TLServeError), error
    assert error.code == code, error
    for fragment in fragments:
        assert fragment in error.message
    assert time.monotonic() - start < 10  # refused before any process starts


def test_the_server_keeps_serving_after_bad_requests(tl, dataset):
    assert tl.health() == "SERVING"
    assert tl.get_dataset("colours").id == dataset.id


# -- DEFAULT weights, in this process ----------------------------------------------------------------


def _folder_samples(root: pathlib.Path) -> tuple[tuple[str, int], ...]:
    return tuple((str(path), label) for label, name in enumerate(sorted(COLOURS))
                 for path in sorted((root / name).glob("*.png")))


def test_default_weights_are_read_from_the_weights_cache_at_each_backbones_own_size(tmp_path):
    """What the child process does for each backbone, here. The server checks a weights
    file's hash against its torchvision name; files made here can't match it, so this
    task skips that check (check_hash=False)."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    task = compare.CompareTask(
        backbones=("mobilenet_v3_small", "efficientnet_b1"), pretrained=True, image_size=0, class_count=3,
        train=_folder_samples(write_colours(tmp_path / "train", per_class=3, seed=2)),
        val=_folder_samples(write_colours(tmp_path / "val", per_class=2, seed=3)),
        weights_dir=str(weights_dir), threads=1, check_hash=False, seed=0,
    )
    provisioned = {}
    for name in task.backbones:
        torch.manual_seed(1)
        provisioned[name] = torchvision.models.get_model(name).state_dict()
        torch.save(provisioned[name], backbones.get_spec(name).default.path(weights_dir))
    results = {name: compare.probe_backbone(name, task, torch.device("cpu"))[0] for name in task.backbones}
    assert results["mobilenet_v3_small"].weights == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert results["efficientnet_b1"].weights == "EfficientNet_B1_Weights.IMAGENET1K_V2"
    assert {name: r.image_size for name, r in results.items()} == {"mobilenet_v3_small": 224, "efficientnet_b1": 240}
    for name, r in results.items():
        assert 0 <= r.probe_accuracy <= 1 and r.latency_p50_seconds > 0 and r.device == "cpu"
        # At the weights' own size, the GMACs are torchvision's figure, less its 1000-class head.
        assert r.gflops == pytest.approx(backbones.get_spec(name).default.gflops, rel=0.05)
    # Without the file, the child's build says which file to provision.
    backbones.get_spec("efficientnet_b1").default.path(weights_dir).unlink()
    with pytest.raises(backbones.WeightsNotCached, match="efficientnet_b1-c27df63c.pth"):
        compare.probe_backbone("efficientnet_b1", task, torch.device("cpu"))
