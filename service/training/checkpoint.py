"""The per-epoch checkpoint: `checkpoint_dir/last.pt`, enough to resume a job
after a crash or a kill -9 exactly where the last finished epoch left it.

It holds the model, optimiser, LR scheduler and gradient scaler states, the epoch
count, the best weights with their metric and epoch, the early-stopping counter,
the history of epoch metrics, AUTO's decision, a fingerprint of the config, and
every random number generator's state (torch CPU and CUDA, numpy, python), so
that on the CPU a resumed run reproduces an unbroken one bit for bit. Everything
is tensors, numbers, strings, bytes, lists and dicts: it loads with
`torch.load(weights_only=True)`, which never unpickles code. Writes are atomic
(temporary file, fsync, rename, fsync of the directory): a crash mid-write
leaves the previous checkpoint intact, and a write that fails (a full disk)
removes its temporary file, which may be as big as the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FILE_NAME = "last.pt"


def path_in(checkpoint_dir: Path) -> Path:
    return Path(checkpoint_dir) / FILE_NAME


def save(state: dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        # Left behind, a partial checkpoint would keep a full disk full.
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def load(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, on the CPU; None when there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# -- random number generators ------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as plain data (python's state is a tuple of
    ints, numpy's a uint32 array: both become lists or tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
