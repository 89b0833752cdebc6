"""The pure parts of bench/finetune.py: the textbook baseline loop on a tiny
procedural dataset, the profiling wrapper around the engine, and the figures
the output must end with. No timing is asserted."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import finetune
from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.training import engine
from tlserve.service.training.synthetic import TARGET_SHAPES

TINY = dataclasses.replace(finetune.SETTINGS["quick"], image_size=32, val=2, test=2)
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return finetune.shapes(tmp_path_factory.mktemp("tiny"), TARGET_SHAPES[:2], TINY, train=4, seed=3)


def test_final_lines_end_with_the_required_figures_in_order():
    figures = {"extra": 1.0, "auto_gap_to_best_points": 3.0, "transfer_minus_scratch_accuracy": -2.5,
               "feature_cache_accuracy_delta": 0.0, "feature_cache_speed_ratio": 6.25, "full_finetune_speed_ratio": 1.014}
    assert finetune.final_lines(figures) == [
        "extra: 1.00",
        "full_finetune_speed_ratio: 1.01",
        "feature_cache_speed_ratio: 6.25",
        "feature_cache_accuracy_delta: 0.00",
        "transfer_minus_scratch_accuracy: -2.50",
        "auto_gap_to_best_points: 3.00",
    ]


def test_baseline_model_takes_the_source_trunk_and_a_new_final_linear(tiny, tmp_path):
    config = finetune.engine_config(tiny, TINY, pb.STRATEGY_FEATURE_EXTRACTION, CPU, seed=0, epochs=1)
    source = engine.fine_tune(config, tiny, weights=finetune.NONE, weights_dir=tmp_path, checkpoint_dir=tmp_path / "c",
                              reporter=finetune.Recorder(), device=CPU)
    model = finetune.baseline_model("resnet18", 5, source)
    assert model.fc.out_features == 5
    assert torch.equal(model.conv1.weight, source.state_dict["trunk.conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_mean, source.state_dict["trunk.layer4.1.bn2.running_mean"])


@pytest.mark.parametrize("frozen", [False, True], ids=["full", "frozen"])
def test_baseline_loop_trains_one_epoch_over_every_training_image(frozen, tiny, tmp_path):
    config = finetune.engine_config(tiny, TINY, pb.STRATEGY_FULL, CPU, seed=0, epochs=1, batch_size=4)
    source = engine.fine_tune(config, tiny, weights=finetune.NONE, weights_dir=tmp_path, checkpoint_dir=tmp_path / "c",
                              reporter=finetune.Recorder(), device=CPU)
    run = finetune.run_baseline(tiny.root, config, source, CPU, frozen=frozen, lr=0.01, epochs=1)
    assert run.images == len(tiny.samples("train")) == 8
    assert 0.0 <= run.test_accuracy <= 1.0
    assert 0 < run.train_seconds <= run.wall


def test_paired_epochs_pairs_every_engine_epoch_with_a_baseline_epoch_and_puts_the_engine_back(tiny, tmp_path):
    original = engine.train_one_epoch
    config = finetune.engine_config(tiny, TINY, pb.STRATEGY_FULL, CPU, seed=0, epochs=3, batch_size=4, patience=0)
    source = engine.fine_tune(config, tiny, weights=finetune.NONE, weights_dir=tmp_path, checkpoint_dir=tmp_path / "c",
                              reporter=finetune.Recorder(), device=CPU)
    baseline = finetune.BaselineLoop(tiny.root, config, source, CPU, frozen=False, lr=0.01)
    seen = []
    baseline.epoch = lambda: seen.append("baseline") or 8
    with finetune.paired_epochs(baseline, CPU) as pairs:
        finetune.run_engine(config, tiny, finetune.source_weights(source), CPU, tmp_path)
    assert engine.train_one_epoch is original
    assert len(pairs) == 3 and len(seen) == 3
    assert all(ours > 0 and base > 0 for ours, base in pairs)


def test_profiled_engine_times_the_stages_and_puts_the_engine_back(tiny, tmp_path):
    original = engine.fit_feature_head
    config = finetune.engine_config(tiny, TINY, pb.STRATEGY_FEATURE_EXTRACTION, CPU, seed=0, epochs=2, cache_features=True)
    run = finetune.run_engine(config, tiny, finetune.NONE, CPU, tmp_path)
    assert engine.fit_feature_head is original
    assert run.seconds["feature cache"] > 0 and run.seconds["fit the head (cached features)"] > 0
    assert "train epochs (images)" not in run.seconds  # the cache replaced image epochs
    assert run.wall >= run.seconds["fit the head (cached features)"]
    assert list(tmp_path.glob("ckpt-*")) == []  # its checkpoint directory is gone


def test_table_aligns_columns_and_formats_floats():
    text = finetune.table(["a", "bb"], [["x", 0.5], ["longer", 2]])
    lines = text.splitlines()
    assert lines[0] == "| a      | bb    |"
    assert lines[2] == "| x      | 0.500 |"
    assert len({len(line) for line in lines}) == 1


def test_the_source_model_is_kept_between_runs_under_a_key_of_its_settings(tmp_path, monkeypatch):
    settings = dataclasses.replace(TINY, source_train=2, source_epochs=1, val=1)
    cache = tmp_path / "cache"
    trained = finetune.load_or_train_source(settings, CPU, tmp_path / "w1", cache)
    assert not trained.from_cache and len(list(cache.glob("source-*.pt"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(finetune, "train_source", no_training)
    loaded = finetune.load_or_train_source(settings, CPU, tmp_path / "w2", cache)
    assert loaded.from_cache and loaded.preprocessing == trained.preprocessing
    assert loaded.test_accuracy == trained.test_accuracy and loaded.epochs_run == trained.epochs_run == 1
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in trained.state_dict.items())
    # Other settings, another key: it would train (and here, refuses to).
    with pytest.raises(AssertionError, match="trained again"):
        finetune.load_or_train_source(dataclasses.replace(settings, source_epochs=2), CPU, tmp_path / "w3", cache)
