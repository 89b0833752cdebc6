"""The validation protocol's rules (`service.training.protocol.choose`): pure logic
on manifests, no training."""

from __future__ import annotations

from pathlib import Path

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.manifest import Manifest
from tlserve.service.training import protocol
from tlserve.service.training.config import PATIENCE


def manifest(train: int, val: int, *, made: tuple[str, ...] = (), classes: int = 2) -> Manifest:
    splits = {
        split: tuple((f"{split}/c{c}/{i}.png", c) for c in range(classes) for i in range(count))
        for split, count in (("train", train), ("val", val), ("test", 3))
    }
    return Manifest(id="ds-test", name="t", root=Path("/data"), class_names=tuple(f"c{c}" for c in range(classes)),
                    splits=splits, made_splits=made)


def request(*, epochs: int | None = None, patience: int | None = None) -> pb.FineTuneRequest:
    r = pb.FineTuneRequest(backbone="resnet18")
    if epochs is not None:
        r.training.epochs = epochs
    if patience is not None:
        r.training.early_stopping.patience = patience
    return r


def test_a_val_split_tlserve_drew_from_a_few_shot_set_goes_back_to_training():
    m = manifest(train=2, val=1, made=("val", "test"))
    plan = protocol.choose(m, request())
    assert plan.kind == pb.VALIDATION_PROTOCOL_FIXED_EPOCHS
    assert len(plan.train) == 6 and plan.val == ()  # every given training image trains
    assert {p for p, _ in plan.train} >= {p for p, _ in m.samples("val")}
    assert plan.images_per_class(2) == 3.0
    assert not plan.selects_weights and plan.patience == 0
    assert "2 validation images tlserve set aside at upload train too" in plan.reason


def test_an_archives_own_small_val_split_is_only_reported():
    m = manifest(train=3, val=2)  # val/ came with the archive
    plan = protocol.choose(m, request())
    assert plan.kind == pb.VALIDATION_PROTOCOL_FIXED_EPOCHS
    assert plan.train == tuple(m.samples("train")) and plan.val == tuple(m.samples("val"))
    assert not plan.selects_weights and "only evaluated and reported" in plan.reason


def test_no_val_split_trains_every_epoch_and_publishes_the_last():
    plan = protocol.choose(manifest(train=4, val=0, made=("test",)), request())
    assert plan.kind == pb.VALIDATION_PROTOCOL_FIXED_EPOCHS and plan.val == ()
    assert "there is no val split" in plan.reason


def test_early_stopping_asked_on_a_tiny_val_split_does_not_run_and_says_so():
    plan = protocol.choose(manifest(train=4, val=2, made=("val",)), request(patience=3))
    assert plan.patience == 0 and not plan.selects_weights
    assert "early stopping asked for does not run" in plan.reason


def test_the_threshold_is_per_class_at_the_smallest_class():
    just = protocol.VAL_MIN_IMAGES_PER_CLASS
    assert protocol.choose(manifest(train=60, val=just, made=("val",)), request()).kind == pb.VALIDATION_PROTOCOL_HOLDOUT
    below = manifest(train=60, val=just, made=("val",))
    below = Manifest(id=below.id, name=below.name, root=below.root, class_names=below.class_names,
                     splits={**below.splits, "val": below.splits["val"][1:]}, made_splits=below.made_splits)
    assert protocol.choose(below, request()).kind == pb.VALIDATION_PROTOCOL_FIXED_EPOCHS


def test_holdout_stops_early_by_default_and_honours_explicit_epochs():
    m = manifest(train=60, val=12, made=("val",))
    default = protocol.choose(m, request())
    assert default.kind == pb.VALIDATION_PROTOCOL_HOLDOUT and default.selects_weights
    assert default.patience == PATIENCE and len(default.train) == 120 and len(default.val) == 24
    assert "early stopping after 5 epochs" in default.reason
    epochs = protocol.choose(m, request(epochs=30))
    assert epochs.patience == 0 and "training.epochs was set" in epochs.reason
    both = protocol.choose(m, request(epochs=30, patience=2))
    assert both.patience == 2
