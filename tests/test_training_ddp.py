"""Distributed fine-tuning: a 2-process gloo job on the CPU under torchrun
matches the one-process run.

The run is built so that the two must agree to rounding: feature extraction on
images (not cached, so DDP, DistributedSampler and the per-process batch are all
in play) with the frozen trunk's BatchNorm in eval mode, no augmentation, no
dropout, and one full batch per step (24 images: 12 per process, no sampler
padding; `min_steps_per_epoch` 1, so the set is read once an epoch). DDP's gradient, the mean of two 12-image means, is then the 24-image
mean of one process, so the weights differ only by the order of float additions
(~1e-7 relative): the accuracies must be equal and the losses within 1e-4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["-m", "tlserve.service.training.selfcheck", "--strategy", "FEATURE_EXTRACTION", "--no-cache", "--no-augment",
        "--epochs", "3", "--batch-size", "24", "--min-steps", "1", "--lr", "0.03", "--quiet"]


def _run(prefix: list[str], tmp_path: Path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [*prefix, *ARGS, "--data", str(tmp_path / "data"), "--checkpoints", str(tmp_path / name), "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_two_process_gloo_run_matches_one_process(tmp_path):
    single = _run([sys.executable], tmp_path, "single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = _run(torchrun, tmp_path, "ddp")
    assert (single["world_size"], double["world_size"]) == (1, 2)
    assert double["val_accuracy"] == single["val_accuracy"]
    assert double["test_accuracy"] == single["test_accuracy"]
    assert double["val_loss"] == pytest.approx(single["val_loss"], abs=1e-4)
    assert double["test_loss"] == pytest.approx(single["test_loss"], abs=1e-4)
    assert double["best_epoch"] == single["best_epoch"] and double["epochs_run"] == 3
