"""A fine-tune on a procedural dataset, end to end, with the metrics as JSON:
the distributed test runs it under torchrun and compares with one process, and
anyone can use it to check an installation (CPU or GPU) without a server.

    torchrun --nproc_per_node 2 -m tlserve.service.training.selfcheck --out result.json \
        --strategy FEATURE_EXTRACTION --backbone resnet18 --epochs 3

Importable: `synthetic_manifest` builds a `Manifest` straight from a
`synthetic.write_image_folder` tree (tests use it too); nothing runs at import.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service import backbones
from tlserve.service.manifest import SPLITS, Manifest
from tlserve.service.training import engine
from tlserve.service.training.config import TrainConfig
from tlserve.service.training.synthetic import TARGET_SHAPES, write_image_folder


def synthetic_manifest(root: Path, classes=TARGET_SHAPES[:3], *, per_split: dict[str, int], size: int = 32, seed: int = 1) -> Manifest:
    """Writes (once) root/<split>/<class>/*.png and returns its manifest."""
    root = Path(root)
    classes = tuple(sorted(classes))
    if not (root / "train").is_dir():
        write_image_folder(root, classes, 0, size=size, seed=seed, splits=per_split)
    splits = {
        split: tuple(
            (f"{split}/{name}/{path.name}", label)
            for label, name in enumerate(classes)
            for path in sorted((root / split / name).glob("*.png"))
        )
        for split in SPLITS
    }
    return Manifest(id="ds-selfcheck", name="shapes", root=root, class_names=classes, splits=splits)


class PrintReporter:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def report(self, event: pb.JobEvent) -> None:
        if not self.quiet:
            print(f"[{pb.JobPhase.Name(event.phase)}] epoch {event.epoch}/{event.total_epochs} "
                  f"step {event.step}/{event.total_steps} {event.message}", file=sys.stderr)

    def cancelled(self) -> bool:
        return False


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    manifest = synthetic_manifest(args.data, per_split={"train": args.train, "val": args.val, "test": args.test}, size=args.size)
    request = pb.FineTuneRequest(backbone=args.backbone, strategy=pb.Strategy.Value(f"STRATEGY_{args.strategy}"),
                                 image_size=args.size, seed=args.seed, devices=int(os.environ.get("WORLD_SIZE", "1")))
    request.training.epochs = args.epochs
    request.training.batch_size = args.batch_size
    if args.min_steps:
        request.training.min_steps_per_epoch = args.min_steps
    request.training.learning_rate = args.lr
    request.training.cache_features = args.cache
    request.training.head_dropout = 0.0
    request.augmentation.enabled = args.augment
    request.training.mixed_precision = pb.MixedPrecision.Value(f"MIXED_PRECISION_{args.precision.upper()}")
    device = torch.device(args.device) if args.device else None
    config = TrainConfig.from_request(
        request, num_classes=len(manifest.class_names), train_images_per_class=args.train,
        device_type=(device or engine._default_device()).type,
    )
    started = time.perf_counter()
    result = engine.fine_tune(config, manifest, weights=backbones.WeightsChoice(kind="none"), weights_dir=args.data,
                              checkpoint_dir=args.checkpoints, reporter=PrintReporter(args.quiet), device=device)
    if result is not None and args.out:
        Path(args.out).write_text(json.dumps({
            "seconds": time.perf_counter() - started,
            "val_accuracy": result.val.top1_accuracy, "val_loss": result.val.loss,
            "test_accuracy": result.test.top1_accuracy, "test_loss": result.test.loss,
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }))
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("var/selfcheck/data"))
    parser.add_argument("--checkpoints", type=Path, default=Path("var/selfcheck/checkpoints"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--strategy", default="FEATURE_EXTRACTION")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--min-steps", type=int, default=0, help="training.min_steps_per_epoch (0: unset, the default 4)")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--train", type=int, default=8)
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--test", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="")
    parser.add_argument("--precision", default="unspecified", choices=["unspecified", "off", "fp16", "bf16"])
    parser.add_argument("--quiet", action="store_true")
    return parser


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
