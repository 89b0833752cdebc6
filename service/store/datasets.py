"""Dataset records in the metadata store: the `datasets` table, as the job and model
tables have theirs. The files (manifest, uploaded images) are the dataset package's
business; this module only keeps the rows.

A dataset is found by id or by name. Lists are newest first with a keyset token,
the (create_time, id) of the last row sent, so pages neither skip nor repeat when
datasets are added in between.
"""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
from collections.abc import Callable, Sequence

from tlserve.client.tlserve.v1 import tlserve_pb2 as pb
from tlserve.service.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from tlserve.service.store import paging
from tlserve.service.store.metadata import MetadataStore


def not_found(dataset: str) -> str:
    return f"dataset {dataset!r} not found; ListDatasets (tlserve datasets list) shows the datasets there are"


class DatasetStore:
    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    def ids(self) -> set[str]:
        return {r["id"] for r in self._store.query("SELECT id FROM datasets")}

    def exists(self, dataset_id: str) -> bool:
        return bool(self._store.query("SELECT 1 FROM datasets WHERE id = ?", (dataset_id,)))

    def id_named(self, name: str) -> str | None:
        rows = self._store.query("SELECT id FROM datasets WHERE name = ?", (name,))
        return rows[0]["id"] if rows else None

    def insert(self, dataset: pb.Dataset, create_time: float, path: str,
               before_commit: Callable[[], None] = lambda: None) -> None:
        """Adds the row; `before_commit` runs inside the write transaction (a last check
        that the upload was not cancelled). AlreadyExists if the name was taken meanwhile."""
        try:
            with self._store.transaction() as conn:
                before_commit()
                conn.execute(
                    "INSERT INTO datasets (id, name, create_time, path, proto) VALUES (?, ?, ?, ?, ?)",
                    (dataset.id, dataset.name, create_time, path, dataset.SerializeToString()),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"a dataset named {dataset.name!r} was created meanwhile; choose another name") from None

    def get(self, dataset: str) -> pb.Dataset:
        """By id or name."""
        if not dataset:
            raise InvalidArgument("dataset is empty; give a dataset id (ds-...) or name")
        rows = self._store.query("SELECT proto FROM datasets WHERE id = ? OR name = ?", (dataset, dataset))
        if not rows:
            raise NotFound(not_found(dataset))
        return pb.Dataset.FromString(rows[0]["proto"])

    def list(self, page_size: int, page_token: str) -> tuple[list[pb.Dataset], str]:
        size = paging.page_size(page_size)
        if page_token:
            try:
                after_time, after_id = json.loads(base64.urlsafe_b64decode(page_token.encode()))
                after_time, after_id = float(after_time), str(after_id)
            except (ValueError, TypeError, binascii.Error):
                raise InvalidArgument(
                    "page_token is not one this server returned; start again with an empty page_token"
                ) from None
            rows = self._store.query(
                "SELECT id, create_time, proto FROM datasets WHERE create_time < ? OR (create_time = ? AND id < ?) "
                "ORDER BY create_time DESC, id DESC LIMIT ?", (after_time, after_time, after_id, size + 1))
        else:
            rows = self._store.query(
                "SELECT id, create_time, proto FROM datasets ORDER BY create_time DESC, id DESC LIMIT ?", (size + 1,))
        page = rows[:size]
        page = page[: paging.fit(page, lambda r: len(r["proto"]))]
        token = ""
        if len(rows) > len(page):
            last = page[-1]
            token = base64.urlsafe_b64encode(json.dumps([last["create_time"], last["id"]]).encode()).decode()
        return [pb.Dataset.FromString(r["proto"]) for r in page], token

    def delete(self, dataset: str, blocking_job_states: Sequence[int]) -> str:
        """Removes the row of `dataset` (id or name) and returns its id; refuses while a
        job in one of `blocking_job_states` uses it. The check and the delete share one
        write transaction, so no job can be queued on it in between."""
        with self._store.transaction() as conn:
            row = conn.execute("SELECT id, name FROM datasets WHERE id = ? OR name = ?", (dataset, dataset)).fetchone()
            if row is None:
                raise NotFound(not_found(dataset))
            marks = ",".join("?" * len(blocking_job_states))
            jobs = conn.execute(
                f"SELECT id FROM jobs WHERE dataset_id IN (?, ?) AND state IN ({marks}) ORDER BY create_time",
                (row["id"], row["name"], *blocking_job_states),
            ).fetchall()
            if jobs:
                ids = ", ".join(j["id"] for j in jobs[:5]) + (" ..." if len(jobs) > 5 else "")
                raise FailedPrecondition(
                    f"dataset {row['name']} ({row['id']}) is used by queued or running job(s) {ids}; "
                    "cancel them (CancelJob) or wait for them to finish, then delete it"
                )
            conn.execute("DELETE FROM datasets WHERE id = ?", (row["id"],))
        return row["id"]
