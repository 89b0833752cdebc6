"""The plain PyTorch reference loop that the accuracy benchmark compares tlserve against
on the same image folders: a textbook fine-tune (AdamW, per-step cosine schedule,
RandomResizedCrop, ImageNet normalisation, cross-entropy, every training image, no early
stopping, one evaluation at the end) written without anything from `service` or
`client`, so that it stays an independent baseline. `run("full", folder, image_size=32,
epochs=30, seed=0, source_state=state)` trains on folder/train (torchvision ImageFolder)
and returns top-1 accuracy on folder/test; `train_model` returns the trained model."""

from __future__ import annotations

import dataclasses
import pathlib
import random
import sys

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import transforms
from torchvision.datasets.folder import find_classes

MODES = ("scratch", "full", "frozen")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Recipe:
    lr: float
    weight_decay: float = 0.05
    batch_size: int = 16  # capped at the training-set size; a last batch of 1 is dropped (BatchNorm needs 2)


RECIPES = {"scratch": Recipe(lr=1e-3), "full": Recipe(lr=3e-4), "frozen": Recipe(lr=1e-3)}


def _dataset(folder: pathlib.Path, image_size: int, train: bool) -> torchvision.datasets.ImageFolder:
    resize = (
        [transforms.RandomResizedCrop(image_size, scale=(0.8, 1.0))]
        if train
        else [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    )
    steps = [*resize, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return torchvision.datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))


def _head_path(model: nn.Module) -> str:
    """The final classifier: the last Linear registered (resnet* `fc`, mobilenet_v3_*
    `classifier.3`, efficientnet `classifier.1`, vit `heads.head`, ...)."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear classifier")
    return linears[-1]


def _load_source(model: nn.Module, source_state: dict[str, torch.Tensor], head: str) -> None:
    """Loads every tensor of `source_state` that the model has with the same shape, the
    head's excepted; every other key of the model must load."""
    if any(key.startswith("trunk.") for key in source_state):  # a tlserve Classifier's own keys
        source_state = {k.removeprefix("trunk."): v for k, v in source_state.items() if k.startswith("trunk.")}
    own = model.state_dict()
    trunk_keys = [k for k in own if not k.startswith(head + ".")]
    kept = {k: v for k, v in source_state.items() if k in trunk_keys and v.shape == own[k].shape}
    missing = [k for k in trunk_keys if k not in kept]
    assert not missing, f"source_state lacks {len(missing)} trunk tensors (or their shapes differ): {missing[:5]}"
    model.load_state_dict(kept, strict=False)
    dropped = sorted(set(source_state) - set(kept))
    print(f"reference: loaded {len(kept)} trunk tensors, dropped {len(dropped)} keys {dropped}", file=sys.stderr)


def build(mode: str, backbone: str, num_classes: int, source_state: dict[str, torch.Tensor] | None) -> nn.Module:
    """The model of `mode`, a new final Linear of `num_classes` on it; in "frozen" mode
    only that Linear requires grad."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if (source_state is None) != (mode == "scratch"):
        raise ValueError(f"mode {mode!r} {'takes no' if mode == 'scratch' else 'needs a'} source_state")
    model = torchvision.models.get_model(backbone, weights=None, num_classes=num_classes)
    if mode == "scratch":
        return model
    head = _head_path(model)
    _load_source(model, source_state, head)
    model.set_submodule(head, nn.Linear(model.get_submodule(head).in_features, num_classes))
    if mode == "frozen":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(head + ".")
    return model


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # weights of the new layers and RandomResizedCrop's draws
    return torch.Generator().manual_seed(seed)  # the DataLoader's shuffling


def train_model(mode: str, data_dir: pathlib.Path, *, backbone: str = "resnet18", image_size: int, epochs: int,
                seed: int, source_state: dict[str, torch.Tensor] | None = None, recipe: Recipe | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """The model of `mode` trained on data_dir/train for `epochs`, left in eval mode."""
    recipe = recipe or RECIPES[mode]
    generator = _seed_everything(seed)
    train_set = _dataset(pathlib.Path(data_dir) / "train", image_size, train=True)
    if len(train_set) < 2:
        raise ValueError(f"{data_dir}/train has {len(train_set)} images: BatchNorm needs batches of 2")
    batch_size = min(recipe.batch_size, len(train_set))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                                         num_workers=0, drop_last=len(train_set) % batch_size == 1)
    model = build(mode, backbone, len(train_set.classes), source_state).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))  # per step
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train(mode != "frozen")  # frozen: the trunk in eval mode (BatchNorm statistics kept)
        for images, labels in loader:
            loss = loss_fn(model(images.to(device)), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, folder: pathlib.Path, image_size: int, device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of `model` (in eval mode) on the ImageFolder `folder`."""
    test_set = _dataset(pathlib.Path(folder), image_size, train=False)
    correct = 0
    for images, labels in torch.utils.data.DataLoader(test_set, batch_size=64, num_workers=0):
        correct += (model(images.to(device)).argmax(dim=1).cpu() == labels).sum().item()
    return correct / len(test_set)


def run(mode: str, data_dir: pathlib.Path, *, backbone: str = "resnet18", image_size: int, epochs: int, seed: int,
        source_state: dict[str, torch.Tensor] | None = None, recipe: Recipe | None = None,
        device: str | torch.device = "cpu") -> float:
    """Trains on data_dir/train (torchvision ImageFolder) and returns top-1 accuracy on data_dir/test."""
    data_dir = pathlib.Path(data_dir)
    train_classes, test_classes = (find_classes(str(data_dir / split))[0] for split in ("train", "test"))
    assert train_classes == test_classes, f"test classes {test_classes} != train classes {train_classes}"
    model = train_model(mode, data_dir, backbone=backbone, image_size=image_size, epochs=epochs, seed=seed,
                        source_state=source_state, recipe=recipe, device=device)
    return evaluate(model, data_dir / "test", image_size, device)
