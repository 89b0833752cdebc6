"""A registered dataset's manifest: which image files belong to which class and split.

Dataset ingestion (`service.datasets`) writes it once the data is validated;
the training engine reads it and never walks the directory itself, so both
agree on the class order and the splits, and a fine-tune is reproducible even
if files are added to a registered directory later.

File: HOME/datasets/<dataset id>/manifest.json

    {"format": 1, "id": "ds-1a2b3c4d", "name": "shapes", "root": "/abs/dir",
     "class_names": ["disc", "square"],
     "splits": {"train": [["disc/a.png", 0], ...], "val": [...], "test": [...]},
     "made_splits": ["val"]}

`root` is the absolute directory the relative paths start from; labels are
indices into `class_names` (sorted). Every split key is present, possibly empty.
`made_splits` names the splits tlserve drew from the training images at
ingestion (the archive had no folder for them): the training engine may give a
made val split back to training when it is too small to choose weights with
(`service.training.protocol`). Manifests written before it existed read as ().
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

FORMAT = 1
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Manifest:
    id: str
    name: str
    root: pathlib.Path
    class_names: tuple[str, ...]
    # split → ((relative path, label), ...)
    splits: dict[str, tuple[tuple[str, int], ...]]
    made_splits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        missing = set(SPLITS) - set(self.splits)
        if missing:
            raise ValueError(f"manifest {self.id} lacks splits {sorted(missing)}")

    def samples(self, split: str) -> list[tuple[pathlib.Path, int]]:
        """(absolute path, label) pairs of one split, in manifest order."""
        return [(self.root / rel, label) for rel, label in self.splits[split]]

    def class_counts(self, split: str) -> list[int]:
        counts = [0] * len(self.class_names)
        for _, label in self.splits[split]:
            counts[label] += 1
        return counts

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "id": self.id,
                "name": self.name,
                "root": str(self.root),
                "class_names": list(self.class_names),
                "splits": {s: [list(item) for item in self.splits[s]] for s in SPLITS},
                "made_splits": list(self.made_splits),
            }
        )

    def save(self, path: pathlib.Path) -> None:
        """Writes atomically: a reader sees the old manifest or the new one."""
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(self.to_json())
        with open(temp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(temp, path)

    @classmethod
    def load(cls, path: pathlib.Path) -> Manifest:
        data = json.loads(pathlib.Path(path).read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: manifest format {data.get('format')} is not {FORMAT}")
        return cls(
            id=data["id"],
            name=data["name"],
            root=pathlib.Path(data["root"]),
            class_names=tuple(data["class_names"]),
            splits={s: tuple((rel, int(label)) for rel, label in data["splits"][s]) for s in SPLITS},
            made_splits=tuple(data.get("made_splits", ())),
        )
