"""bench/realdata.py (the real image sets, their splits and folders) and bench/reference.py
(the plain PyTorch loop) on tiny data: seconds each on 2 CPU cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from bench import realdata, reference

# name -> (source classes, target classes, target image side, target images)
EXPECTED = {
    "digits": (5, 5, 8, 896),
    "mnist": (5, 5, 28, 2500),
    "faces": (5, 2, 25, 200),
    "textures": (5, 3, 32, 768),
}


@pytest.mark.parametrize("name", sorted(realdata.SETS))
def test_set_loads_with_documented_shapes(name):
    real = realdata.SETS[name]()
    source_classes, target_classes, side, count = EXPECTED[name]
    assert real.name == name and real.description
    for task, classes in ((real.source, source_classes), (real.target, target_classes)):
        assert task.images.dtype == np.uint8 and task.images.ndim == 4 and task.images.shape[-1] == 3
        assert task.labels.dtype == np.int64 and task.labels.shape == (len(task.images),)
        assert len(task.class_names) == classes and list(task.class_names) == sorted(task.class_names)
        assert set(np.unique(task.labels)) == set(range(classes))
        # grey replicated to the three channels
        assert (task.images[..., 0] == task.images[..., 1]).all() and (task.images[..., 1] == task.images[..., 2]).all()
    assert real.target.images.shape == (count, side, side, 3)
    assert not set(real.source.class_names) & set(real.target.class_names)
    # the documented medium size and the test size fit every target class
    realdata.sample_splits(real.target, real.medium_per_class, real.test_per_class, seed=0)
    assert realdata.SETS[name]() is real  # cached


def test_loading_is_deterministic():
    first = realdata.load_textures_set()
    realdata.load_textures_set.cache_clear()
    second = realdata.load_textures_set()
    assert first is not second
    for a, b in ((first.source, second.source), (first.target, second.target)):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_texture_source_patches_are_not_flat():
    source = realdata.load_textures_set().source
    assert source.images.shape[1:] == (32, 32, 3)
    assert source.images[..., 0].reshape(len(source.images), -1).std(axis=1).min() >= realdata.FLAT_STD
    assert np.bincount(source.labels).max() <= realdata.SOURCE_PATCHES_PER_CLASS


def test_digits_scaled_to_full_range():
    real = realdata.load_digits_set()
    assert real.source.images.max() == 255 and real.target.images.min() == 0
    assert real.source.class_names == ("d0", "d1", "d2", "d3", "d4")
    assert real.target.class_names == ("d5", "d6", "d7", "d8", "d9")


def test_sample_splits_nested_and_fixed_test():
    task = realdata.load_digits_set().target
    small = realdata.sample_splits(task, 5, 100, seed=3)
    large = realdata.sample_splits(task, 50, 100, seed=3)
    assert not set(large["train"]) & set(large["test"])
    assert np.array_equal(small["test"], large["test"])
    assert set(small["train"]) < set(large["train"])
    assert np.array_equal(np.bincount(task.labels[large["train"]]), [50] * 5)
    assert np.array_equal(np.bincount(task.labels[large["test"]]), [100] * 5)
    other = realdata.sample_splits(task, 5, 100, seed=4)
    assert not np.array_equal(other["test"], small["test"])
    # d8 has the fewest images (174)
    with pytest.raises(ValueError, match="'d8'"):
        realdata.sample_splits(task, 75, 100, seed=0)


def test_write_image_folder_round_trips(tmp_path):
    task = realdata.load_faces_set().target
    splits = realdata.sample_splits(task, 2, 1, seed=0)
    realdata.write_image_folder(tmp_path, task, splits)
    for split, indices in splits.items():
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == ["face", "nonface"]
        for index in indices:
            path = tmp_path / split / task.class_names[task.labels[index]] / f"{index}.png"
            with Image.open(path) as image:
                assert image.mode == "RGB"
                assert np.array_equal(np.asarray(image), task.images[index])


def _tiny_digits_folder(root, train=4, test=4):
    """2 digits classes (d5, d6) x `train` train / `test` test images."""
    target = realdata.load_digits_set().target
    keep = target.labels < 2
    task = realdata.Task("tiny", target.images[keep], target.labels[keep], target.class_names[:2])
    realdata.write_image_folder(root, task, realdata.sample_splits(task, train, test, seed=0))
    return root


def test_reference_scratch_runs(tmp_path, one_torch_thread):
    accuracy = reference.run("scratch", _tiny_digits_folder(tmp_path), image_size=32, epochs=2, seed=0)
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0


def _tlserve_like_resnet18_state() -> dict[str, torch.Tensor]:
    """A resnet18 state dict whose head is tlserve's: fc.0 Dropout + fc.1 Linear (7 classes)."""
    torch.manual_seed(123)
    source = torchvision.models.resnet18(weights=None)
    source.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(512, 7))
    # non-default BatchNorm statistics, so that "unchanged" is not "still the defaults"
    for name, buffer in source.named_buffers():
        if name.endswith("running_mean"):
            buffer.normal_()
    return {k: v.clone() for k, v in source.state_dict().items()}


def test_reference_frozen_leaves_trunk_unchanged(tmp_path, one_torch_thread):
    state = _tlserve_like_resnet18_state()
    model = reference.train_model("frozen", _tiny_digits_folder(tmp_path), image_size=32, epochs=2, seed=0,
                                  source_state=state)
    after = model.state_dict()
    trunk = [k for k in after if not k.startswith("fc.")]
    assert trunk and all(torch.equal(after[k], state[k]) for k in trunk)  # weights and BatchNorm statistics
    assert after["fc.weight"].shape == (2, 512)
    untrained = reference.build("frozen", "resnet18", 2, state)
    assert not torch.equal(after["fc.weight"], untrained.fc.weight.detach())  # the head did train


def test_reference_full_needs_every_trunk_tensor():
    state = _tlserve_like_resnet18_state()
    model = reference.build("full", "resnet18", 3, state)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model.conv1.weight, state["conv1.weight"]) and model.fc.out_features == 3
    del state["layer4.1.bn2.weight"]
    with pytest.raises(AssertionError, match="layer4.1.bn2.weight"):
        reference.build("full", "resnet18", 3, state)
    with pytest.raises(ValueError):
        reference.build("full", "resnet18", 3, None)


def test_reference_mobilenet_v3_head():
    source = torchvision.models.mobilenet_v3_small(weights=None, num_classes=7)
    model = reference.build("frozen", "mobilenet_v3_small", 3, source.state_dict())
    assert reference._head_path(model) == "classifier.3" and model.classifier[-1].out_features == 3
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.3.weight", "classifier.3.bias"]
    assert torch.equal(model.classifier[0].weight, source.classifier[0].weight)
